"""planc serve's decoding: a sequence's tokens do not depend on what else is in flight.

For every architecture family in the corpus (a real config with tiny dimensions, random weights,
run for real on the CPU), sequences that join and leave a running batch at different steps get
exactly the tokens `planc run`'s generate gives each of them alone, and the batched decode step is
what produced them (start-up proved it bit-identical). Then the pieces around it: a failing
sequence fails alone, stop strings, and the token budget against max_seq_len.
"""

from __future__ import annotations

import pytest

from conftest import FAMILIES, PLANS, shrink
from planc.plan import load_lock
from planc.serve.engine import Engine, Sampling
from planc.serve.protocol import APIError

PROMPT_LENGTHS = (5, 9, 14, 20)  # around the tiny configs' sliding window of 8
NEW_TOKENS = (8, 3, 8, 5)  # the second and fourth leave the batch early


@pytest.fixture(scope="module")
def plan():
    return load_lock(PLANS / "tiny-cpu.lock")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from planc.run.generate import load_tokenizer

    return load_tokenizer(tiny_model, load_lock(PLANS / "tiny-cpu.lock"))


def tiny_model_of(name: str, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from planc.model import make_config

    config = shrink(name)
    config["vocab_size"] = len(tokenizer)
    config["eos_token_id"] = tokenizer.eos_token_id
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config(config), dtype=torch.float32).eval()


def alone(model, tokenizer, plan, prompt: list[int], new_tokens: int) -> list[int]:
    """`planc run`'s generate for this one prompt (planc.run.generate, the plan's settings)."""
    import torch

    from planc.run.apply import pinned_attention
    from planc.run.generate import generate, generation_config

    batch = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
    config = generation_config(model, tokenizer, plan, new_tokens)
    with pinned_attention(plan):
        (completion,) = generate(model, tokenizer, batch, ["-"], config, "cpu", stream=False)
    return completion.token_ids


def decode_staggered(engine: Engine, prompts: list[list[int]], new_tokens) -> list:
    """One sequence joins per step while the others decode; finished ones leave."""
    sequences = [engine.new_sequence(p, n, Sampling(), []) for p, n in zip(prompts, new_tokens)]
    pending, running, widest = list(sequences), [], 0
    while pending or running:
        if pending:
            sequence = pending.pop(0)
            engine.prefill(sequence)
            running.append(sequence)
        running = [s for s in running if s.finish_reason is None]
        widest = max(widest, len(running))
        for result in engine.step(running):
            assert not isinstance(result, BaseException), result
        running = [s for s in running if s.finish_reason is None]
    assert widest > 1
    return sequences


def random_prompts(vocabulary: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocabulary, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_decoding_gives_every_sequence_its_tokens_alone(name, tokenizer, plan):
    model = tiny_model_of(name, tokenizer)
    engine = Engine(model, tokenizer, plan)

    how = engine.prove_batching(len(PROMPT_LENGTHS))
    prompts = random_prompts(len(tokenizer))
    sequences = decode_staggered(engine, prompts, NEW_TOKENS)

    assert how.startswith("batched:") and "bit-identical" in how, how
    for sequence, prompt, new_tokens in zip(sequences, prompts, NEW_TOKENS):
        assert sequence.token_ids == alone(model, tokenizer, plan, prompt, new_tokens)


@pytest.mark.parametrize("rows", [2, 3, 4, 6, 8])
def test_every_row_of_a_batched_product_is_its_one_row_product(rows):
    """nn.Linear (F.linear) and GPT-2's Conv1D (torch.addmm) under the batching mode: each row's
    bits are those of the row alone. A CPU BLAS takes a GEMM over several rows whose summation order
    is not the one-row call's (this build's does from 4 rows here, at 2 or 3 on CI's machine)."""
    import torch
    import torch.nn.functional as F

    from planc.serve.invariant import RowExactLinear

    generator = torch.Generator().manual_seed(rows)
    for features, out in ((64, 192), (64, 256), (256, 64)):
        x = torch.randn(rows, features, generator=generator)
        weight = torch.randn(features, out, generator=generator)
        bias = torch.randn(out, generator=generator)
        alone_linear = [F.linear(x[i : i + 1].clone(), weight.t(), bias) for i in range(rows)]
        alone_addmm = [torch.addmm(bias, x[i : i + 1].clone(), weight) for i in range(rows)]
        mode = RowExactLinear()
        for _ in range(2):  # the first call checks the batched GEMV, the second may take it
            with mode:
                linear = F.linear(x, weight.t(), bias)
                addmm = torch.addmm(bias, x, weight)
            assert torch.equal(linear, torch.cat(alone_linear))
            assert torch.equal(addmm, torch.cat(alone_addmm))


def test_a_sequence_that_fails_inside_a_batched_step_fails_alone(tokenizer, plan):
    model = tiny_model_of("qwen3-8b", tokenizer)
    engine = Engine(model, tokenizer, plan)
    engine.prove_batching(3)
    prompts = random_prompts(len(tokenizer), (6, 11, 7))
    sequences = [engine.new_sequence(p, 6, Sampling(), []) for p in prompts]
    for sequence in sequences:
        engine.prefill(sequence)
    broken = sequences[1]

    def update(*args, **kwargs):
        raise RuntimeError("this layer's cache is gone")

    broken.cache.layers[2].update = update  # fails in the middle of the forward, after layers 0-1 grew
    results = engine.step(sequences)

    assert isinstance(results[1], RuntimeError)
    survivors = [sequences[0], sequences[2]]
    while any(s.finish_reason is None for s in survivors):
        for result in engine.step([s for s in survivors if s.finish_reason is None]):
            assert not isinstance(result, BaseException)
    for sequence, prompt in zip(survivors, [prompts[0], prompts[2]]):
        assert sequence.token_ids == alone(model, tokenizer, plan, prompt, 6)


def test_a_stop_string_across_tokens_ends_the_text_before_it(tokenizer):
    from planc.serve.text import TextStream

    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, ["own fox"])
    sent, stopped_at = "", None
    for index, token in enumerate(ids):
        delta, stopped = stream.push(token)
        sent += delta
        if stopped:
            stopped_at = index
            break

    assert stopped_at is not None and sent == "The quick br"
    assert "own fox" in tokenizer.decode(ids[: stopped_at + 1])  # it stopped where the string completed
    assert "own fox" not in tokenizer.decode(ids[:stopped_at])


def test_text_streamed_piece_by_piece_is_the_whole_decode(tokenizer):
    from planc.serve.text import TextStream

    ids = tokenizer("A device map places each decoder layer on one device.")["input_ids"]
    stream = TextStream(tokenizer, ["never there"])
    pieces = [stream.push(token)[0] for token in ids] + [stream.flush()]

    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("prompt", "requested", "default", "expected"),
    [
        (10, 20, 16, 20),  # asked for, fits
        (10, None, 16, 16),  # the completions default
        (60, None, 16, 4),  # the default cut to the room left
        (10, None, None, 54),  # chat: the rest of the context
        (10, 54, None, 54),  # exactly max_seq_len
    ],
)
def test_the_token_budget_fits_max_seq_len(prompt, requested, default, expected):
    from planc.serve.app import token_budget

    assert token_budget(prompt, requested, default, max_seq_len=64) == expected


@pytest.mark.parametrize(
    ("prompt", "requested", "message"),
    [
        (10, 55, "prompt 10 tokens + max_tokens 55 = 65 > the plan's max_seq_len 64; ask for at most 54 tokens"),
        (64, None, "the prompt is 64 tokens; the plan's max_seq_len 64 leaves no room to generate"),
    ],
)
def test_a_budget_over_max_seq_len_is_a_400_naming_the_limit(prompt, requested, message):
    from planc.serve.app import token_budget

    with pytest.raises(APIError) as refused:
        token_budget(prompt, requested, 16, max_seq_len=64)

    assert refused.value.status == 400 and refused.value.message == message
    assert refused.value.code == "context_length_exceeded"


def test_layers_offloaded_to_disk_batch_exactly_too(tiny_model, tmp_path):
    """accelerate's hooks stream offloaded layers in; the rows split inside the hook, tokens stay exact."""
    from test_run import compile_to

    from planc.memory import CPU_PROCESS_RESERVE
    from planc.run import open_session

    def spec(cpu_memory: str, offload: str) -> str:
        return (f"planc: 1\nmodel: {{path: {tiny_model}}}\nhardware: {{gpus: [], cpu_memory: {cpu_memory}, "
                f"disk: offload/}}\nworkload: {{batch_size: 4, max_seq_len: 64}}\npolicy: {{offload: {offload}}}\n")

    (tmp_path / "roomy").mkdir()
    ledger = load_lock(compile_to(tmp_path / "roomy", spec("8GiB", "cpu"))).memory[0]
    # Room for the running terms (as test_run's disk test) and three quarters of the weights.
    running = ledger.total - ledger.weights - CPU_PROCESS_RESERVE
    lock = compile_to(tmp_path, spec(str(CPU_PROCESS_RESERVE + int(running * 1.05) + ledger.weights * 3 // 4), "disk"))
    plan = load_lock(lock)
    assert set(plan.device_map.values()) == {"cpu", "disk"}

    with open_session(plan, tmp_path) as session:
        engine = Engine(session.model, session.tokenizer, plan)
        how = engine.prove_batching(4)
        prompts = [session.tokenizer(text)["input_ids"] for text in ("The quick brown fox", "A device map",
                                                                     "The KV cache grows with", "planc")]
        sequences = decode_staggered(engine, prompts, NEW_TOKENS)
        texts = [session.tokenizer.decode(p) for p in prompts]
        expected = [session.generate([text], n)[0].token_ids for text, n in zip(texts, NEW_TOKENS)]

    assert how.startswith("batched:"), how
    assert [s.token_ids for s in sequences] == expected
