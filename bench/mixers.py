"""Per mixer family at its real size: the state a layer keeps per sequence, and the prefill
transient per token on the torch fallback (ledger vs a fake-tensor execution of the real module)
and on the kernel path (ledger only: the kernels need CUDA).

    PYTHONPATH=src .venv/bin/python -m bench.mixers [--tokens 2048] [--batch 1]

The state formulas are held to real caches to the byte on tiny models in tests/test_hybrid.py;
this table shows what they come to at the released models' sizes.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KiB, MiB = 2**10, 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    sys.path.insert(0, str(REPO / "tests"))
    from hybrid_models import AT_SCALE, mixer_prefill_peak

    from planc.model.cache import FALLBACK, KERNELS
    from planc.workload import Workload

    print(f"bfloat16, batch {args.batch} x {args.tokens} tokens, one layer of each family at its class-default size")
    print("| model type | family | state per sequence | fallback KiB/token: ledger | simulated | error | kernels KiB/token: ledger |")
    print("|---|---|---|---|---|---|---|")
    for model_type in AT_SCALE:
        tokens = min(args.tokens, 512) if model_type == "jamba" else args.tokens  # a Python loop per token
        measured, mixer = mixer_prefill_peak(model_type, tokens, args.batch)
        at = Workload(args.batch, tokens)
        fallback = mixer.transient_bytes(at, "bfloat16", FALLBACK)
        kernels = mixer.transient_bytes(at, "bfloat16", KERNELS)
        n = args.batch * tokens
        print(
            f"| {model_type} | {mixer.family} | {mixer.state_bytes('bfloat16') / KiB:,.0f} KiB | "
            f"{fallback / n / KiB:,.1f} | {measured / n / KiB:,.1f} | {(fallback - measured) / measured:+.1%} | "
            f"{kernels / n / KiB:,.1f} |"
        )


if __name__ == "__main__":
    main()
