"""Tensor and pipeline parallelism: the strategy layer's plans, their per-rank ledgers, and real runs.

Runs are real: `planc run` starts two gloo ranks with torch's launcher on the CPU, each loads its
share of a tiny Qwen3 with transformers' DistributedConfig, and the tokens must equal one plain
transformers process. Compile-only cases use real public configs (examples/models, bench/corpus).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORPUS, EXAMPLES, REPO, write_spec
from planc.compile import compile_spec
from planc.errors import InfeasibleError, RunError, SpecError
from planc.parallel.pipeline import transformers_stage_ranges, vllm_stage_ranges
from planc.plan import load_lock, write_if_changed
from planc.run import run_plan
from test_run import PROMPTS, plain_transformers_tokens

MAX_NEW_TOKENS = 8

CPU_RANKS_SPEC = """\
planc: 1
model: {{path: {model}}}
hardware: {{gpus: [], cpu_memory: 8GiB, cpu_ranks: {ranks}}}
workload: {{batch_size: 2, max_seq_len: 64}}
policy: {{parallelism: {parallelism}}}
"""


def compile_to(folder: Path, text: str, name: str = "plan.lock") -> Path:
    spec = write_spec(folder, text)
    lock = folder / name
    _, lock_text = compile_spec(spec, lock)
    write_if_changed(lock, lock_text)
    return lock


def planc_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "planc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def config_spec(config: Path, hardware: str, workload: str = "{batch_size: 1, max_seq_len: 8192}", policy: str = "{}") -> str:
    return f"planc: 1\nmodel: {{config: {config}}}\nhardware: {hardware}\nworkload: {workload}\npolicy: {policy}\n"


# ---------------------------------------------------------------- real runs on CPU ranks (gloo)


@pytest.mark.parametrize("parallelism", ["tensor", "pipeline"])
def test_two_ranks_give_the_tokens_of_one_process(parallelism, tiny_model, tmp_path, cpu_env):
    lock = compile_to(tmp_path, CPU_RANKS_SPEC.format(model=tiny_model, ranks=2, parallelism=parallelism))
    plan = load_lock(lock)
    assert plan.parallel.strategy == parallelism and len(plan.parallel.ranks) == 2
    assert plan.parallel.backend == "gloo"
    prompt_args = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    result = planc_cli("run", str(lock), *prompt_args, "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # rank 0 alone prints: one JSON document
    tokens = [entry["token_ids"] for entry in report["results"]]
    # A padded batch of two prompts: the second row exercises the pipeline stage's masks.
    assert tokens == plain_transformers_tokens(tiny_model, PROMPTS, MAX_NEW_TOKENS)
    assert report["memory"][0]["device"] == "rank 0 cpu"


def test_tensor_ledger_halves_the_sharded_weights(tiny_model, tmp_path):
    single_spec = CPU_RANKS_SPEC.format(model=tiny_model, ranks=1, parallelism="auto").replace(
        "{parallelism: auto}", "{offload: cpu}")
    single = load_lock(compile_to(tmp_path, single_spec, "single.lock"))
    tp = load_lock(compile_to(tmp_path, CPU_RANKS_SPEC.format(model=tiny_model, ranks=2, parallelism="tensor"), "tp.lock"))
    whole = single.model.weight_bytes
    ranks = [ledger for ledger in tp.memory if ledger.rank is not None]
    assert [ledger.rank for ledger in ranks] == [0, 1] and ranks[0].weights == ranks[1].weights
    # Norms and the rotary table stay whole on every rank; everything the TP plan names is halved:
    # rank = sharded / 2 + replicated and whole = sharded + replicated.
    replicated = 2 * ranks[0].weights - whole
    assert 0 < replicated < 0.02 * whole
    # Two KV heads split over two ranks: each rank's cache is half the single process's.
    single_kv = next(ledger for ledger in single.memory if ledger.device == "cpu").kv_cache
    assert ranks[0].kv_cache * 2 == single_kv


def test_pipeline_ranks_use_transformers_split(tiny_model, tmp_path):
    folder = tmp_path / "five"
    from conftest import build_tiny_model

    model = build_tiny_model(folder / "model", num_layers=5)
    plan = load_lock(compile_to(folder, CPU_RANKS_SPEC.format(model=model, ranks=2, parallelism="pipeline")))
    assert [rank.layers for rank in plan.parallel.ranks] == [[0, 2], [2, 5]]  # the last stage takes the remainder
    assert transformers_stage_ranges(126, 16)[-1] == (105, 126)
    assert vllm_stage_ranges(61, 2) == [(0, 31), (31, 61)]
    ledgers = {ledger.rank: ledger for ledger in plan.memory}
    assert ledgers[1].kv_cache * 2 == ledgers[0].kv_cache * 3  # 3 layers' cache against 2


@pytest.mark.parametrize(
    ("heads", "kv_heads", "reason"),
    [(5, 5, "num_attention_heads 5 is not divisible by 2"), (6, 3, "num_key_value_heads 3 is not divisible by 2")],
)
def test_heads_that_do_not_divide_are_refused_at_compile(heads, kv_heads, reason, tmp_path):
    config = json.loads((EXAMPLES / "models/tiny-qwen3/config.json").read_text())
    config.update(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=16 * heads)
    (tmp_path / "config.json").write_text(json.dumps(config))
    text = CPU_RANKS_SPEC.format(model="x", ranks=2, parallelism="tensor").replace("{path: x}", "{config: config.json}")
    with pytest.raises(InfeasibleError, match=reason):
        compile_spec(write_spec(tmp_path, text))
    result = planc_cli("compile", "spec.yaml", cwd=tmp_path)
    assert result.returncode == 2 and reason in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "plan.lock").exists()


# ---------------------------------------------------------------- strategies on real configs


def test_nvswitch_node_plans_tensor_parallel_llama_70b(tmp_path):
    spec = config_spec(EXAMPLES / "models/llama-3.1-70b/config.json",
                       "{gpus: [{type: h100-sxm, count: 8}], cpu_memory: 2TiB, interconnect: nvswitch}")
    plan, _ = compile_spec(write_spec(tmp_path, spec), tmp_path / "plan.lock")
    assert plan.parallel.strategy == "tensor" and plan.parallel.tensor_parallel_size == 8
    options = {(o.strategy, o.tensor_parallel_size): o for o in plan.parallel.considered}
    tp8, device_map = options[("tensor", 8)], options[("device_map", 1)]
    assert tp8.decode_ms_per_token * 1.6 < device_map.decode_ms_per_token
    assert plan.objective.decode_ms_per_token == tp8.decode_ms_per_token
    assert "collectives" in tp8.detail
    weights = [ledger.weights for ledger in plan.memory]
    assert len(set(weights)) == 1 and abs(weights[0] * 8 - plan.model.weight_bytes) < 0.01 * plan.model.weight_bytes
    assert plan.device_map == {} and plan.format_version == "1.1"


def test_without_interconnect_the_plan_is_todays(tmp_path):
    spec = config_spec(EXAMPLES / "models/llama-3.1-70b/config.json", "{gpus: [{type: h100-sxm, count: 8}], cpu_memory: 2TiB}")
    plan, _ = compile_spec(write_spec(tmp_path, spec), tmp_path / "plan.lock")
    assert plan.parallel is None and plan.format_version == "1.0" and plan.device_map


def test_kv_heads_limit_the_tensor_group(tmp_path):
    # Qwen3-30B-A3B: 32 query heads, 4 KV heads: transformers cannot split it 8 ways.
    spec = config_spec(CORPUS / "qwen3-30b-a3b/config.json",
                       "{gpus: [{type: h100-sxm, count: 8}], cpu_memory: 2TiB, interconnect: nvswitch}")
    plan, _ = compile_spec(write_spec(tmp_path, spec), tmp_path / "plan.lock")
    assert plan.parallel.tensor_parallel_size == 4 and len(plan.parallel.ranks) == 4
    refused = next(o for o in plan.parallel.considered if o.tensor_parallel_size == 8)
    assert not refused.fits and "num_key_value_heads 4 is not divisible by 8" in refused.detail


def test_two_nodes_go_to_vllm_when_transformers_split_does_not_fit(tmp_path):
    node = "{gpus: [{type: h100-sxm, count: 8}], cpu_memory: 2TiB, interconnect: nvswitch}"
    hardware = f"{{nodes: [{node}, {node}], network: {{bandwidth: 400GB/s, latency: 5us}}}}"
    spec = config_spec(_405b_config(tmp_path), hardware)
    lock = tmp_path / "plan.lock"
    plan, text = compile_spec(write_spec(tmp_path, spec), lock)
    write_if_changed(lock, text)
    assert (plan.parallel.strategy, plan.parallel.engine) == ("tensor x pipeline", "vllm")
    assert {rank.node for rank in plan.parallel.ranks} == {0, 1} and len(plan.memory) == 16
    pipeline = next(o for o in plan.parallel.considered if o.strategy == "pipeline")
    assert not pipeline.fits and "layers 105-125" in pipeline.detail  # transformers gives the last rank 21 layers
    device_map = next(o for o in plan.parallel.considered if o.strategy == "device_map")
    assert not device_map.fits
    with pytest.raises(RunError, match="planc export --to vllm"):
        run_plan(lock, prompts=["hi"])


def _405b_config(tmp_path: Path) -> Path:
    """Llama-3.1-405B's config (the 70B's with the 405B's published sizes)."""
    config = json.loads((EXAMPLES / "models/llama-3.1-70b/config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=53248, num_attention_heads=128, num_hidden_layers=126,
                  num_key_value_heads=8)
    path = tmp_path / "llama-405b.json"
    path.write_text(json.dumps(config))
    return path


def test_multi_node_run_prints_each_nodes_command(tiny_model, tmp_path):
    node = "{gpus: [], cpu_memory: 8GiB, cpu_ranks: 1}"
    spec = (f"planc: 1\nmodel: {{path: {tiny_model}}}\nhardware: {{nodes: [{node}, {node}], network: "
            "{bandwidth: 10GB/s, latency: 20us}}\nworkload: {batch_size: 1, max_seq_len: 64}\n")
    lock = compile_to(tmp_path, spec)
    plan = load_lock(lock)
    assert plan.parallel.strategy == "pipeline" and [r.node for r in plan.parallel.ranks] == [0, 1]
    result = planc_cli("run", str(lock), "--prompt", "hello", cwd=tmp_path)
    assert result.returncode == 2
    assert "--node-rank 0 --master-addr NODE0_ADDRESS" in result.stdout
    assert "--node-rank 1 --master-addr NODE0_ADDRESS" in result.stdout
    assert "pass --node-rank and --master-addr" in result.stderr


def test_two_nodes_on_one_host_run_the_pipeline(tiny_model, tmp_path, cpu_env):
    """Each node's printed command, run for real (both 'nodes' on this host): the stages rendezvous over
    TCP and rank 0 prints the tokens of one process."""
    import socket

    node = "{gpus: [], cpu_memory: 8GiB, cpu_ranks: 1}"
    spec = (f"planc: 1\nmodel: {{path: {tiny_model}}}\nhardware: {{nodes: [{node}, {node}], network: "
            "{bandwidth: 10GB/s, latency: 20us}}\nworkload: {batch_size: 2, max_seq_len: 64}\n")
    lock = compile_to(tmp_path, spec)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), CUDA_VISIBLE_DEVICES="")
    prompt_args = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "planc", "run", str(lock), "--node-rank", str(rank), "--master-addr", "127.0.0.1",
             "--master-port", port, *prompt_args, "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=600) for process in nodes]
    assert [process.returncode for process in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert outputs[1][0].strip() == ""  # node 1 holds rank 1: it prints nothing
    tokens = [entry["token_ids"] for entry in json.loads(outputs[0][0])["results"]]
    assert tokens == plain_transformers_tokens(tiny_model, PROMPTS, MAX_NEW_TOKENS)


def test_spec_forms_of_nodes_and_interconnect(tmp_path):
    from planc.spec import parse_spec

    base = {"planc": 1, "model": {"config": "c.json"}, "workload": {"max_seq_len": 16}}
    node = {"gpus": [{"type": "h100-sxm", "count": 2}], "cpu_memory": "1TiB"}
    with pytest.raises(SpecError, match="network: required with several nodes"):
        parse_spec({**base, "hardware": {"nodes": [node, node]}})
    with pytest.raises(SpecError, match="inside `nodes`"):
        parse_spec({**base, "hardware": {"nodes": [node], "cpu_memory": "1TiB"}})
    with pytest.raises(SpecError, match=r"\[0\]\[1\] is NV18 but \[1\]\[0\] is SYS"):
        parse_spec({**base, "hardware": {**node, "interconnect": {"links": [["X", "NV18"], ["SYS", "X"]]}}})
    spec = parse_spec({**base, "hardware": {**node, "interconnect": {"links": [["X", "NV18"], ["NV18", "X"]]}}})
    assert spec.hardware.node_list()[0].interconnect.links[0][1] == "NV18"
    # A spec without the new fields hashes as before (they are left out of the canonical JSON).
    plain = parse_spec({**base, "hardware": node})
    assert "interconnect" not in plain.canonical_json() and "parallelism" not in plain.canonical_json()


def test_simulate_runs_each_tensor_rank_on_its_own_virtual_device(tiny_model, tmp_path):
    lock = compile_to(tmp_path, CPU_RANKS_SPEC.format(model=tiny_model, ranks=2, parallelism="tensor"))
    result = planc_cli("simulate", str(lock), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [device["name"] for device in report["devices"]] == ["rank 0 CPU rank", "rank 1 CPU rank"]
    for device in report["devices"]:
        # Each rank holds half of what the TP plan splits: the simulated weights are the ledger's.
        assert device["simulated_weights"] == device["planned"]["weights"]
        assert -0.05 <= device["ledger_error"] <= 0.25
    pipeline = compile_to(tmp_path, CPU_RANKS_SPEC.format(model=tiny_model, ranks=2, parallelism="pipeline"), "pp.lock")
    refused = planc_cli("simulate", str(pipeline), cwd=tmp_path)
    assert refused.returncode == 2 and "executes device_map and tensor-parallel plans" in refused.stderr


def test_one_process_loaders_refuse_a_tensor_plan(tiny_model, tmp_path):
    import planc

    lock = compile_to(tmp_path, CPU_RANKS_SPEC.format(model=tiny_model, ranks=2, parallelism="tensor"))
    with pytest.raises(RunError, match="tensor over 2 ranks: each process loads one share"):
        planc.load(lock)
