"""planc serve under load against the anchor: plain transformers `generate`, one request at a time.

    PYTHONPATH=src python -m bench.serve [--model small|tiny] [--threads N] [--markdown docs/benchmarks.md]

C clients (1, 4, 16), each sending its requests back to back (greedy, 32 new tokens, prompts of
10-40 tokens). The anchor is what people write without a server: one loaded model and a lock, each
request a `model.generate` call of its own, so concurrent clients queue for it. planc serve runs as
a real process (`planc serve PLAN --port 0`, the plan at batch_size 16) and is driven with the
openai client, once with `--batching exact` (the default) and once with `--batching fast`.
Latency is per request as the client sees it (queueing included); tokens/s is all generated tokens
over the level's wall time.

The model: `small` (default) is a Qwen3 with random weights, 8 layers, hidden 512, 25 M parameters
in float32 (100 MB), big enough that decode steps cost more than Python does; `tiny` is the
bundled 4-layer example (hidden 64), where per-step overheads dominate. `--threads` sets torch's
intra-op threads of both (OMP_NUM_THREADS for the server); on a machine shared with other jobs,
1 keeps OpenMP from spinning against them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "models" / "tiny-qwen3"
CLIENTS = (1, 4, 16)
NEW_TOKENS = 32
BATCH_SIZE = 16
MAX_SEQ_LEN = 256
SENTENCES = [
    "planc compiles a model, a GPU inventory and a workload into a plan.",
    "The quick brown fox jumps over the lazy dog.",
    "Attention kernels differ by compute capability and dtype.",
    "A device map places each decoder layer on one device.",
    "The KV cache grows with batch size and context length.",
]
SMALL = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64}


@dataclass(frozen=True)
class Level:
    system: str
    clients: int
    requests: int
    latencies: list[float]
    tokens: int
    seconds: float

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prompts() -> list[str]:
    """Prompts of 10-40 tokens from the tokenizer's own sentences."""
    words = " ".join(SENTENCES).split()
    return [" ".join(words[i : i + 6 + (i * 7) % 22]) for i in range(24)]


def requests_for(clients: int) -> int:
    return max(8, 3 * clients)


def build_model(kind: str, folder: Path) -> Path:
    """The benchmark's model folder: the bundled tiny model, or a random `small` Qwen3 with its tokenizer."""
    if kind == "tiny":
        return TINY
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    model = folder / "small-qwen3"
    model.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY / name, model / name)
    tokenizer = AutoTokenizer.from_pretrained(model)
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=MAX_SEQ_LEN * 2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SMALL)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(model)
    return model


def compile_plan(model: Path, folder: Path) -> Path:
    from planc.compile import compile_spec
    from planc.plan import write_if_changed

    spec = folder / "spec.yaml"
    spec.write_text(
        f"planc: 1\nmodel: {{path: {model}}}\nhardware: {{gpus: [], cpu_memory: 8GiB}}\n"
        f"workload: {{batch_size: {BATCH_SIZE}, max_seq_len: {MAX_SEQ_LEN}}}\npolicy: {{offload: cpu}}\n"
    )
    lock = folder / "plan.lock"
    _, text = compile_spec(spec, lock)
    write_if_changed(lock, text)
    return lock


def drive(system: str, clients: int, call) -> Level:
    """`clients` threads, each sending its share of the requests back to back through `call(prompt)`,
    which returns the number of tokens generated."""
    count = requests_for(clients)
    texts = prompts()
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def client(index: int) -> None:
        nonlocal tokens
        for number in range(index, count, clients):
            started = time.perf_counter()
            generated = call(texts[number % len(texts)])
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                tokens += generated

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return Level(system, clients, count, latencies, tokens, time.perf_counter() - started)


def anchor(model_folder: Path) -> list[Level]:
    """Plain transformers: one model, one `generate` per request, requests taking turns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    turn = threading.Lock()

    def call(prompt: str) -> int:
        inputs = tokenizer(prompt, return_tensors="pt")
        with turn, torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        return output.shape[1] - inputs["input_ids"].shape[1]

    call(prompts()[0])  # warm-up
    return [drive("transformers generate, one at a time", clients, call) for clients in CLIENTS]


def served(lock: Path, batching: str, threads: int | None) -> list[Level]:
    """planc serve as a process, driven with the openai client."""
    from openai import OpenAI

    log = lock.parent / f"serve-{batching}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "planc", "-q", "serve", str(lock), "--port", "0", "--max-queue", "64",
               "--batching", batching]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        while not (ready := re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            if process.poll() is not None:
                raise SystemExit(f"planc serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{ready.group(1)}/v1", api_key="unused", max_retries=0,
                        timeout=600)
        name = _model_name(lock)

        def call(prompt: str) -> int:
            response = client.completions.create(model=name, prompt=prompt, max_tokens=NEW_TOKENS)
            return response.usage.completion_tokens

        call(prompts()[0])  # warm-up
        return [drive(f"planc serve --batching {batching}", clients, call) for clients in CLIENTS]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def _model_name(lock: Path) -> str:
    from planc.plan import load_lock
    from planc.serve import served_name

    return served_name(load_lock(lock))


def table_rows(levels: list[Level]) -> list[list[str]]:
    anchor_rate = {level.clients: level.tokens_per_s for level in levels if level.system.startswith("transformers")}
    rows = []
    for level in levels:
        speedup = level.tokens_per_s / anchor_rate[level.clients]
        rows.append([level.system, str(level.clients), str(level.requests), f"{level.percentile(0.5):.2f}",
                     f"{level.percentile(0.99):.2f}", f"{level.tokens_per_s:.0f}", f"{speedup:.2f}x"])
    return rows


HEADERS = ["system", "clients", "requests", "p50 latency (s)", "p99 latency (s)", "tokens/s", "vs anchor"]


def markdown(levels: list[Level], kind: str, threads: int | None) -> str:
    from bench.placement import machine, planc_revision

    flag = f" --threads {threads}" if threads else ""
    lines = [
        f"Command: `PYTHONPATH=src python -m bench.serve --model {kind}{flag}`; {NEW_TOKENS} new tokens per request, "
        f"greedy; the plan at batch_size {BATCH_SIZE}, max_seq_len {MAX_SEQ_LEN}  ",
        f"Machine: {machine()}; planc at {planc_revision()}; load average {os.getloadavg()[0]:.1f} at the end "
        "(other jobs shared the cores).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(levels)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "tiny"], default="small")
    parser.add_argument("--threads", type=int, help="torch intra-op threads  [default: torch's]")
    parser.add_argument("--markdown", type=Path, help="write the table into this markdown file (between markers)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    scratch = Path(tempfile.mkdtemp(prefix="planc-bench-serve-"))
    try:
        model = build_model(args.model, scratch)
        lock = compile_plan(model, scratch)
        levels = anchor(model) + served(lock, "exact", args.threads) + served(lock, "fast", args.threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = Table(title=f"planc serve against transformers generate one request at a time ({args.model} model)")
    for header in HEADERS:
        table.add_column(header)
    for row in table_rows(levels):
        table.add_row(*row)
    Console(width=160).print(table)
    if args.markdown:
        from bench.placement import write_block

        write_block(args.markdown, markdown(levels, args.model, args.threads), f"bench.serve.{args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
