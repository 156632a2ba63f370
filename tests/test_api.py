"""`import planc` as users write it: only the package's public names (planc.compile, planc.load, ...)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import planc
from conftest import EXAMPLES, PLANS, REPO, write_spec
from test_run import CPU_SPEC, PROMPTS, MAX_NEW_TOKENS, plain_transformers_tokens, reseal


def test_import_planc_is_light():
    code = (
        "import sys, planc\n"
        "plan = planc.load_plan('plans/tiny-cpu.lock')\n"
        "assert planc.check('examples/tiny-cpu.yaml', 'plans/tiny-cpu.lock') == []\n"
        "assert callable(planc.compile) and callable(planc.load)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'networkx') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_compile_then_load_plan(tmp_path):
    spec = write_spec(tmp_path, (EXAMPLES / "qwen3-8b-2xv100.yaml").read_text().replace(
        "models/qwen3-8b/config.json", str(EXAMPLES / "models/qwen3-8b/config.json")))

    plan = planc.compile(spec)
    assert isinstance(plan, planc.Plan) and not (tmp_path / "plan.lock").exists()
    assert planc.compile(spec, write=True) == plan
    assert planc.load_plan(tmp_path / "plan.lock") == plan
    assert plan.device_map == planc.load_plan(PLANS / "qwen3-8b-2xv100.lock").device_map  # the committed placement
    assert planc.check(spec) == []

    with pytest.raises(planc.SpecError):
        planc.compile(tmp_path / "missing.yaml")
    with pytest.raises(planc.LockError):
        planc.load_plan(tmp_path / "missing.lock")


@pytest.fixture
def lock(tiny_model, tmp_path) -> Path:
    spec = write_spec(tmp_path, CPU_SPEC.format(model=tiny_model, policy=""))
    planc.compile(spec, write=True)
    return tmp_path / "plan.lock"


def test_load_hands_back_a_model_that_generates_as_planc_run(lock, tiny_model, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    plan = planc.load_plan(lock)
    # A CPU plan sets no variables of its own: give it one a GPU plan's rules set.
    reseal(lock, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        model, tokenizer = planc.load(lock)

        # What stays in force after load returns: the environment and torch's deterministic mode.
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        assert torch.are_deterministic_algorithms_enabled()
        # The model pins the plan's SDPA backends (flash, math) during its own forwards only.
        during = []
        model.register_forward_pre_hook(lambda module, args: during.append(torch.backends.cuda.mem_efficient_sdp_enabled()))
        assert plan.attention.sdpa_backends == ["flash", "math"]
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        output = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS)  # the plan's decoding settings are the defaults
        assert during and not any(during)
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    rows = output[:, batch["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    assert [row[: row.index(eos) + 1] if eos in row else row for row in rows] == plain_transformers_tokens(
        tiny_model, PROMPTS, MAX_NEW_TOKENS)
    assert {str(p.device) for p in model.parameters()} == {"cpu"}  # where the plan puts every entry


def test_a_refused_load_leaves_the_process_as_it_was(lock, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    plan = planc.load_plan(lock)
    other = plan.inputs.packages.model_copy(update={"transformers": "4.0.0"})
    reseal(lock, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, inputs=plan.inputs.model_copy(update={"packages": other}))

    with pytest.raises(planc.DriftError, match="transformers"):
        planc.load(lock)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_from_pretrained_kwargs_place_the_model(lock, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = planc.from_pretrained_kwargs(lock)
    assert kwargs["dtype"] is torch.float32 and list(kwargs["device_map"]) == list(planc.load_plan(lock).device_map)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, **kwargs)
    assert {str(p.device) for p in model.parameters()} == {"cpu"}
    assert planc.from_pretrained_kwargs(planc.load_plan(lock)) == kwargs


def test_from_pretrained_kwargs_of_a_disk_plan_need_the_lock_folder(tmp_path):
    plan = planc.load_plan(PLANS / "tiny-cpu.lock")
    disk_plan = plan.model_copy(update={
        "device_map": {**plan.device_map, "lm_head": "disk"},
        "host": plan.host.model_copy(update={"disk": "offload/"}),
    })
    with pytest.raises(planc.UsageError, match="pass lock_dir"):
        planc.from_pretrained_kwargs(disk_plan)
    assert planc.from_pretrained_kwargs(disk_plan, tmp_path)["offload_folder"] == str(tmp_path / "offload")
