"""Predicted vs measured peak memory per GPU on a real card: the truth test of planc's ledger.

    PYTHONPATH=src python -m bench.truth [--model qwen3-8b] [--cases 1x4096,8x8192,2x32768] [--work DIR]

Everything else in bench/ runs on a laptop; this needs the CUDA GPUs it measures. For a corpus
config (bench/corpus/<model>/config.json, a real model's; no hub), it writes random weights once
(built on GPU 0 at the plan's dtype, saved with save_pretrained) and a word-level tokenizer of the
config's vocabulary, so the folder is a real checkpoint that `planc run` accepts. Then, per case
(batch x max_seq_len):
1. compile a plan for the GPUs this machine has (the catalogue entry of each driver-reported
   name), from the folder, as a user would;
2. load it with `planc.load` (the machine checks, the plan's environment, SDPA backends and
   placement, what `planc run` does), unless the previous case's placement is the same;
3. generate greedily from batch x (max_seq_len - new) random prompt tokens, `new` tokens each (the
   whole context the plan is for), after resetting torch's peak counters;
4. print, per GPU, the ledger's tensors (weights + KV + activations + staging) against
   torch.cuda.max_memory_allocated, and the ledger's total (with the reserve for the CUDA
   context, cuBLAS workspace and allocator slack) against the device's used memory at the end of
   the run (total - free from cudaMemGetInfo, which sees the context and the caching allocator's
   reserve as well). The ledger is meant to be at or a little above each measurement.

`--prepare-only` writes the folder and compiles the plans without a GPU (the spec names the cards
by --gpu), to check a case list before spending device time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

CORPUS = Path(__file__).resolve().parent / "corpus"
GIB = 1024**3


@dataclass
class Row:
    case: str
    device: int
    name: str
    weights: int
    kv_cache: int
    activations: int
    reserve: int
    planned_tensors: int
    measured_allocated: int | None
    planned_total: int
    measured_used: int | None
    seconds: float

    @property
    def tensor_error(self) -> float | None:
        """(planned - measured) / measured of the tensors: negative when the ledger was short."""
        if not self.measured_allocated:
            return None
        return (self.planned_tensors - self.measured_allocated) / self.measured_allocated

    @property
    def total_error(self) -> float | None:
        if not self.measured_used:
            return None
        return (self.planned_total - self.measured_used) / self.measured_used


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        batch, sep, tokens = item.strip().partition("x")
        if not sep or not batch.isdigit() or not tokens.isdigit():
            raise SystemExit(f"--cases {text!r}: write BATCHxTOKENS[,...], e.g. 1x4096,4x16384")
        cases.append((int(batch), int(tokens)))
    return cases


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary ("w0" ... ), enough for planc run's checks:
    the prompts here are token ids, not text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", pad_token="w0", eos_token="w1")
    tokenizer.save_pretrained(folder)


def write_checkpoint(model_name: str, folder: Path, dtype: str, device: str) -> dict:
    """config.json of the corpus model, random weights at `dtype` built on `device` (meta: the config
    only), and a tokenizer; returns the config."""
    config = json.loads((CORPUS / model_name / "config.json").read_text())
    if (folder / "model.safetensors.index.json").exists() or (folder / "model.safetensors").exists():
        return config
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    hf_config = AutoConfig.for_model(**config)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
    if device != "meta":
        model.save_pretrained(folder, max_shard_size="5GB")
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    else:
        hf_config.save_pretrained(folder)  # --prepare-only: the plans compile from the config
    write_tokenizer(folder, hf_config.get_text_config().vocab_size)
    print(f"wrote {folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return config


def write_spec(path: Path, folder: Path, gpus: list[str], batch: int, tokens: int, dtype: str, weights: bool) -> None:
    source = {"path": str(folder)} if weights else {"config": str(folder / "config.json")}
    spec = {
        "planc": 1,
        "model": {**source, "dtype": dtype},
        "hardware": {"gpus": [{"type": name} for name in gpus], "cpu_memory": "64GiB"},
        "workload": {"batch_size": batch, "max_seq_len": tokens},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def measure(plan, model, batch: int, tokens: int, new: int) -> tuple[dict[int, int], dict[int, int]]:
    """Generate batch x tokens (prompt + new) and return torch's allocator peak and cudaMemGetInfo's used bytes per GPU."""
    import torch

    from planc.run.generate import input_device

    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (batch, tokens - new), generator=generator).to(input_device(plan))
    gpus = [device.index for device in plan.devices]
    for index in gpus:
        torch.cuda.synchronize(index)
        torch.cuda.reset_peak_memory_stats(index)
    with torch.inference_mode():
        output = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new
        )
    if output.shape[1] != tokens:
        raise SystemExit(f"generated {output.shape[1]} tokens per sequence, not {tokens}")
    allocated, used = {}, {}
    for index in gpus:
        torch.cuda.synchronize(index)
        allocated[index] = torch.cuda.max_memory_allocated(index)
        free, total = torch.cuda.mem_get_info(index)
        used[index] = total - free
    return allocated, used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-8b", help="A folder of bench/corpus.")
    parser.add_argument("--cases", default="1x4096,8x8192,2x32768", help="BATCHxTOKENS, comma-separated.")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens generated per sequence (of max_seq_len).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--work", type=Path, help="Folder for the checkpoint and plans (default: a temp folder).")
    parser.add_argument("--json", type=Path, help="Write the rows as JSON.")
    parser.add_argument("--prepare-only", action="store_true", help="Write the folder and compile; no GPU.")
    parser.add_argument("--gpu", action="append", help="With --prepare-only: a catalogue card to plan for (repeatable).")
    args = parser.parse_args(argv)
    if not (CORPUS / args.model / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no bench/corpus/{args.model}/config.json")
    cases = parse_cases(args.cases)
    import torch

    import planc
    from planc.errors import PlancError

    if args.prepare_only:
        gpus = args.gpu or ["NVIDIA H200"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.truth measures real GPUs and this machine has none (try --prepare-only)")
        gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    work = args.work or Path(tempfile.mkdtemp(prefix="planc-truth-"))
    folder = work / args.model
    write_checkpoint(args.model, folder, args.dtype, "meta" if args.prepare_only else "cuda:0")
    rows: list[Row] = []
    loaded, placement = None, None
    for batch, tokens in cases:
        case = f"{batch}x{tokens}"
        spec, lock = work / f"{case}.yaml", work / f"{case}.lock"
        write_spec(spec, folder, gpus, batch, tokens, args.dtype, weights=not args.prepare_only)
        try:
            plan = planc.compile(spec, lock, write=True)
        except PlancError as exc:
            print(f"{case}: not planned: {exc}")
            continue
        ledgers = {ledger.device: ledger for ledger in plan.memory}
        allocated: dict[int, int] = {}
        used: dict[int, int] = {}
        started = time.perf_counter()
        if not args.prepare_only:
            key = (json.dumps(plan.device_map, sort_keys=True), plan.dtype, json.dumps(plan.attention.model_dump(), sort_keys=True))
            if key != placement:
                loaded = None
                torch.cuda.empty_cache()
                loaded, _ = planc.load(lock)
                placement = key
            allocated, used = measure(plan, loaded, batch, tokens, min(args.new_tokens, tokens - 1))
        for device in plan.devices:
            ledger = ledgers[device.index]
            tensors = ledger.weights + ledger.kv_cache + ledger.activations + ledger.staging
            rows.append(Row(case, device.index, device.name, ledger.weights, ledger.kv_cache, ledger.activations,
                            ledger.reserve, tensors, allocated.get(device.index), ledger.total,
                            used.get(device.index), time.perf_counter() - started))
    print(table(rows, args.model))
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return 0


def table(rows: list[Row], model: str) -> str:
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GIB:.2f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1%}"

    lines = [
        f"Model: {model} (random weights from its config). Tensors: ledger weights + KV + activations vs "
        "torch.cuda.max_memory_allocated; total: ledger with reserve vs the device's used memory (cudaMemGetInfo).",
        "",
        "| case | GPU | weights | KV | activations | planned tensors | measured peak | error | planned total | used | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.case} | {row.device} {row.name} | {gib(row.weights)} | {gib(row.kv_cache)} | {gib(row.activations)} "
            f"| {gib(row.planned_tensors)} | {gib(row.measured_allocated)} | {pct(row.tensor_error)} "
            f"| {gib(row.planned_total)} | {gib(row.measured_used)} | {pct(row.total_error)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
