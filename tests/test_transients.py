"""Transients the ledger once missed, each held to `planc simulate`'s fake-tensor execution of the
real transformers model (a few layers of the class's default config, split over two GPUs): what a
module allocates beyond the softmax attention and MLP formulas (docs/coverage.md's rows where the
ledger was more than 10% below the simulated peak).
"""

from __future__ import annotations

import json

import pytest

from planc.compile import compile_spec
from planc.plan import load_lock, write_if_changed
from planc.simulate import simulate_plan
from test_simulate import LEDGER_TOLERANCE


def simulated_errors(folder, model_type: str, overrides: dict, seq: int, gpus: int = 2, batch: int = 1) -> dict:
    """Compile the class default config of `model_type` with `overrides` for `gpus` A100s, simulate
    the plan; per GPU (planned tensors - simulated peak) / simulated peak."""
    from transformers import AutoConfig, PretrainedConfig

    config = AutoConfig.for_model(model_type).to_dict()
    config.update(overrides)
    config.pop("transformers_version", None)
    (folder / "config.json").write_text(json.dumps(PretrainedConfig._encode_special_floats(config)))
    (folder / "spec.yaml").write_text(
        f"planc: 1\nmodel: {{config: config.json}}\nhardware: {{gpus: [{{type: a100-sxm4-80gb, count: {gpus}}}], "
        f"cpu_memory: 64GiB}}\nworkload: {{batch_size: {batch}, max_seq_len: {seq}}}\n"
    )
    plan, text = compile_spec(folder / "spec.yaml", folder / "plan.lock")
    write_if_changed(folder / "plan.lock", text)
    assert len({str(device) for device in plan.device_map.values()}) == gpus  # split: the ledger is per GPU
    report = simulate_plan(load_lock(folder / "plan.lock"), folder, decode_steps=1)
    assert report.ok, report.error
    return {device.index: round(device.ledger_error, 3) for device in report.devices}


CASES = [
    # Dynamic mask attention: a per-KV-head mask over the whole context and its top-k beyond
    # keep_window_size, in the model dtype, on a causal mask the model always builds.
    pytest.param("doge", dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                              num_key_value_heads=2, keep_window_size=256), 1024, 1, id="dynamic-mask-doge"),
]


@pytest.mark.parametrize(("model_type", "overrides", "seq", "batch"), CASES)
def test_ledger_holds_the_module_transients(tmp_path, model_type, overrides, seq, batch):
    errors = simulated_errors(tmp_path, model_type, overrides, seq, batch=batch)

    assert all(abs(error) <= LEDGER_TOLERANCE for error in errors.values()), errors
