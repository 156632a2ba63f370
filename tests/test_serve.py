"""planc serve as a real server: `planc serve` runs as a subprocess on 127.0.0.1 (an ephemeral port),
the official `openai` client and raw HTTP talk to it, and the tiny Qwen3 decodes on the CPU.

Two servers: one at batch_size 4 with room to queue (answers, streaming, a load test, bad
requests, disconnects) and one at batch_size 2 with a queue of 1 and a fault injected into
token choice (429 beyond the limits, one failing request among good ones, SIGTERM drain).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import PLANS, REPO, SENTENCES
from planc.compile import compile_spec
from planc.plan import dump_lock, load_lock, write_if_changed

MODEL = "tiny-qwen3"
READY = re.compile(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1")
STARTUP_TIMEOUT = 240
POISON = [5, 5, 5, 5]  # a prompt starting with these token ids fails once it has generated a token
HOLD = "hold"  # while this file exists in the server's folder, its decoding pauses (FAULTY_LAUNCHER)

SPEC = """\
planc: 1
model: {{path: {model}}}
hardware: {{gpus: [], cpu_memory: 8GiB}}
workload: {{batch_size: {batch}, max_seq_len: {seq}}}
policy: {{offload: cpu{policy}}}
"""

FAULTY_LAUNCHER = f"""\
import os
import time

from transformers import LogitsProcessor
from transformers.generation.utils import GenerationMixin

class Poison(LogitsProcessor):
    def __init__(self, prompt_length):
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        if input_ids[0, :{len(POISON)}].tolist() == {POISON} and input_ids.shape[1] > self.prompt_length:
            raise RuntimeError("injected fault")
        # While the test's hold file exists, a decode step of two sequences pauses: the requests in
        # flight keep their slots however slow the machine is.
        while os.path.exists("{HOLD}") and input_ids.shape[0] > 1:
            time.sleep(0.01)
        return scores

original = GenerationMixin._get_logits_processor

def processors(self, generation_config, input_ids_seq_length=None, *args, **kwargs):
    chosen = original(self, generation_config, input_ids_seq_length, *args, **kwargs)
    chosen.append(Poison(input_ids_seq_length))
    return chosen

GenerationMixin._get_logits_processor = processors
from planc.cli import main
main(prog_name="planc")
"""


def compile_plan(folder: Path, model: Path, batch: int, seq: int, policy: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(model=model, batch=batch, seq=seq, policy=policy))
    lock = folder / "plan.lock"
    _, text = compile_spec(spec, lock)
    write_if_changed(lock, text)
    return lock


def server_env(cache: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                PLANC_CACHE_DIR=str(cache))


class Server:
    """`planc serve LOCK` in a subprocess; `url` once its ready line names the port."""

    def __init__(self, lock: Path, *args: str, launcher: Path | None = None):
        self.log = lock.parent / "server.log"
        program = [str(launcher)] if launcher else ["-m", "planc"]
        command = [sys.executable, *program, "-q", "serve", str(lock), "--port", "0", *args]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=server_env(lock.parent / "cache"), cwd=lock.parent)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (found := READY.search(self.log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"planc serve did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.port = int(found.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def terminate(self, timeout: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def health(self) -> dict:
        return request(self, "GET", "/health")[1]

    def metric(self, name: str) -> float:
        """A sample's value from /metrics, e.g. 'planc_requests_total{endpoint="chat",status="200"}'."""
        text = request(self, "GET", "/metrics", raw=True)[1]
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def request(server: Server, method: str, path: str, body: bytes | None = None, raw: bool = False,
            headers: dict | None = None):
    """(status, JSON body or text, headers) of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        data = response.read().decode()
        return response.status, data if raw else json.loads(data), dict(response.getheaders())
    finally:
        connection.close()


def complete(client, prompt, max_tokens: int, stream: bool = False) -> tuple[str, list[int], str]:
    """(text, token ids, finish reason) of one /v1/completions request."""
    extra = {"return_token_ids": True}
    if not stream:
        choice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=extra).choices[0]
        return choice.text, choice.model_extra["token_ids"], choice.finish_reason
    text, ids, finish = "", [], None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True,
                                           extra_body=extra):
        choice = chunk.choices[0]
        text += choice.text
        ids += choice.model_extra["token_ids"]
        finish = choice.finish_reason or finish
    return text, ids, finish


def planc_run_tokens(lock: Path, prompt: str, max_new_tokens: int) -> list[int]:
    """What `planc run LOCK --prompt PROMPT` generates, through its API, the prompt alone."""
    from planc.run import run_plan

    outcome = run_plan(lock, prompts=[prompt], max_new_tokens=max_new_tokens, as_json=True, quiet=True)
    return outcome.completions[0].token_ids


# ---------------------------------------------------------------------- the servers


@pytest.fixture(scope="module")
def roomy(tiny_model, tmp_path_factory):
    """batch_size 4, max_seq_len 64, 12 may wait: 16 concurrent clients are all served."""
    lock = compile_plan(tmp_path_factory.mktemp("roomy"), tiny_model, batch=4, seq=64)
    server = Server(lock, "--max-queue", "12")
    yield server
    assert server.terminate() == 0, server.log.read_text()


@pytest.fixture(scope="module")
def tight(tiny_model, tmp_path_factory):
    """batch_size 2, max_seq_len 256, 1 may wait; a request whose prompt starts with POISON fails."""
    folder = tmp_path_factory.mktemp("tight")
    lock = compile_plan(folder, tiny_model, batch=2, seq=256)
    launcher = folder / "faulty_planc.py"
    launcher.write_text(FAULTY_LAUNCHER)
    server = Server(lock, "--max-queue", "1", launcher=launcher)
    yield server
    server.terminate()


# ---------------------------------------------------------------------- answers


def test_completions_equal_planc_run_streaming_or_not(roomy, tiny_model):
    client = roomy.client()
    prompt = "The quick brown fox"

    text, ids, finish = complete(client, prompt, 8)
    streamed = complete(client, prompt, 8, stream=True)

    assert ids == planc_run_tokens(roomy.log.parent / "plan.lock", prompt, 8)
    assert finish == "length" and len(ids) == 8
    assert streamed == (text, ids, finish)
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    assert response.choices[0].text == text
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 8)


def test_chat_uses_the_tokenizers_chat_template(roomy, tiny_model):
    from transformers import AutoTokenizer

    client = roomy.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a device map?"}]

    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                           extra_body={"return_token_ids": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))

    rendered = AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<s>assistant\n")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.model_extra["token_ids"] == planc_run_tokens(roomy.log.parent / "plan.lock", rendered, 6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_sampling_follows_the_requests_seed(roomy):
    client = roomy.client()

    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text

    first, again, other = sample(7), sample(7), sample(8)

    assert first == again
    assert first != other  # 12 draws over 191 tokens from a random model: equal only by a fluke
    assert first != complete(client, "The quick brown fox", 12)[0]  # and not the greedy text


def test_models_health_and_metrics(roomy):
    client = roomy.client()

    (card,) = client.models.list().data
    health = roomy.health()
    status, metrics, headers = request(roomy, "GET", "/metrics", raw=True)

    assert card.id == MODEL and card.model_extra["max_model_len"] == 64
    assert client.models.retrieve(MODEL).id == MODEL
    assert health["status"] == "ok" and health["batch_size"] == 4 and health["max_queue"] == 12
    assert health["batching"].startswith("batched: up to 4 sequences per decode step, bit-identical")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("planc_sequences_in_flight", "planc_requests_queued", "planc_rejected_requests_total",
                 "planc_prompt_tokens_total", "planc_generation_tokens_total", "planc_request_duration_seconds_bucket",
                 "planc_time_to_first_token_seconds_bucket", "planc_queue_wait_seconds_bucket",
                 "planc_decode_step_sequences_bucket", "planc_batch_size 4.0", "planc_max_queue 12.0"):
        assert name in metrics, name


def test_load_200_requests_from_16_clients_each_get_their_single_request_tokens(roomy):
    client = roomy.client()
    words = " ".join(SENTENCES).split()
    cases = [(" ".join(words[i : i + 1 + i % 7]), 3 + i % 6) for i in range(25)]
    alone = {case: complete(client, *case)[1] for case in cases}
    steps_before = roomy.metric("planc_decode_step_sequences_count")
    rows_before = roomy.metric("planc_decode_step_sequences_sum")

    def one(index: int):
        prompt, max_tokens = cases[index % len(cases)]
        return (prompt, max_tokens), complete(client, prompt, max_tokens, stream=index % 3 == 0)[1]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    elapsed = time.perf_counter() - started

    assert len(results) == 200  # every request answered: no 5xx, no 429 (an exception would have raised)
    wrong = [(case, ids, alone[case]) for case, ids in results if ids != alone[case]]
    assert not wrong, wrong[:3]
    lock = roomy.log.parent / "plan.lock"
    for case in cases[::9]:  # and served alone is planc run
        assert alone[case] == planc_run_tokens(lock, *case), case
    steps = roomy.metric("planc_decode_step_sequences_count") - steps_before
    rows = roomy.metric("planc_decode_step_sequences_sum") - rows_before
    assert rows / steps > 2, "concurrent requests were not decoded together"
    assert roomy.metric("planc_rejected_requests_total") == 0
    for status in ("500", "503"):
        assert roomy.metric(f'planc_requests_total{{endpoint="completions",status="{status}"}}') == 0
    print(f"\n200 requests, 16 clients: {elapsed:.1f} s, {rows / steps:.2f} sequences per decode step")


# ---------------------------------------------------------------------- bad requests


def body(**fields) -> bytes:
    return json.dumps({"model": MODEL, **fields}).encode()


BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"model": "tiny-qwen3", "prompt": ', 400, "not valid JSON", None),
    "not an object": ("/v1/completions", b"[1, 2]", 400, "must be a JSON object", None),
    "string for an integer": ("/v1/completions", body(prompt="hi", max_tokens="5"), 400, "valid integer",
                              "max_tokens"),
    "number for a boolean": ("/v1/completions", body(prompt="hi", stream=1), 400, "valid boolean", "stream"),
    "no prompt": ("/v1/completions", body(), 400, "prompt: Field required", "prompt"),
    "empty prompt": ("/v1/completions", body(prompt=""), 400, "prompt is empty", "prompt"),
    "token id outside the vocabulary": ("/v1/completions", body(prompt=[1, 99999]), 400, "outside the vocabulary",
                                        "prompt"),
    "huge max_tokens": ("/v1/completions", body(prompt="hi", max_tokens=10**9), 400,
                        "> the plan's max_seq_len 64", "max_tokens"),
    "prompt over max_seq_len": ("/v1/completions", body(prompt=" ".join(SENTENCES) * 2), 400,
                                "leaves no room to generate", "prompt"),
    "zero max_tokens": ("/v1/completions", body(prompt="hi", max_tokens=0), 400, "greater than or equal to 1",
                        "max_tokens"),
    "unsupported n": ("/v1/completions", body(prompt="hi", n=2), 400, "does not support n", "n"),
    "two prompts": ("/v1/completions", body(prompt=["a", "b"]), 400, "one prompt per request", "prompt"),
    "five stop strings": ("/v1/completions", body(prompt="hi", stop=list("abcde")), 400, "at most 4", "stop"),
    "unknown model": ("/v1/completions", json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), 404,
                      "this server serves 'tiny-qwen3'", "model"),
    "no messages": ("/v1/chat/completions", body(messages=[]), 400, "at least 1 item", "messages"),
    "unknown role": ("/v1/chat/completions", body(messages=[{"role": "robot", "content": "hi"}]), 400,
                     "messages.0.role", "messages.0.role"),
    "image content": ("/v1/chat/completions",
                      body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
                      "messages.0.content.0.type: Input should be 'text'", "messages.0.content.0.type"),
    "prompt of the wrong type": ("/v1/completions", body(prompt=5), 400, "prompt: int is not one of the accepted",
                                 "prompt"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_a_bad_request_is_a_4xx_in_openais_error_shape(roomy, case):
    path, payload, status, message, param = BAD_REQUESTS[case]

    got, answer, _ = request(roomy, "POST", path, payload)

    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert message in answer["error"]["message"]
    assert answer["error"]["param"] == param
    assert roomy.health()["status"] == "ok"


def test_unknown_routes_methods_and_oversized_bodies_get_json_errors(roomy):
    assert request(roomy, "GET", "/v1/nothing")[:2] == (404, {"error": {
        "message": "GET /v1/nothing: Not Found", "type": "not_found_error", "param": None, "code": None}})
    assert request(roomy, "GET", "/v1/completions")[0] == 405
    status, answer, _ = request(roomy, "POST", "/v1/completions", b"x" * (2 << 20))
    assert status == 413 and "at most" in answer["error"]["message"]


def test_the_openai_client_sees_typed_errors(roomy):
    import openai

    client = roomy.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_seq_len 64"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=500)


def test_a_client_that_disconnects_frees_its_slot(roomy):
    steps = roomy.metric("planc_decode_step_sequences_count")
    gone = roomy.metric('planc_requests_total{endpoint="completions",status="499"}')
    for stream in (True, False):
        with socket.create_connection(("127.0.0.1", roomy.port)) as connection:
            payload = body(prompt="The KV cache", max_tokens=60, stream=stream)
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            if stream:
                assert connection.recv(4096).startswith(b"HTTP/1.1 200")  # the first event came; now leave
    deadline = time.monotonic() + 60
    while roomy.metric('planc_requests_total{endpoint="completions",status="499"}') < gone + 2:
        assert time.monotonic() < deadline, "the disconnects were not noticed"
        time.sleep(0.1)
    while roomy.health()["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    # Two requests of 60 tokens run to the end would take 118 decode steps or more.
    assert roomy.metric("planc_decode_step_sequences_count") - steps < 100
    assert complete(roomy.client(), "The KV cache", 3)[2] == "length"  # and the server goes on


# ---------------------------------------------------------------------- the plan's limits, faults, drain


def hold(server: Server, prompt: str, max_tokens: int, started: threading.Event, results: list):
    """A streaming request that reads its first event, then holds its slot until told to finish."""
    chunks = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True)
    started.set()
    results.append("".join(chunk.choices[0].text for chunk in chunks))


def wait_for(condition, server: Server, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.05)


def test_beyond_batch_size_requests_queue_and_beyond_the_queue_get_429(tight):
    import openai

    started = [threading.Event() for _ in range(3)]
    results: list[str] = []
    threads = [threading.Thread(target=hold, args=(tight, f"A device map {i}", 80, started[i], results))
               for i in range(3)]
    paused = tight.log.parent / HOLD
    paused.touch()  # the two in flight keep their slots until the checks are done
    try:
        for thread in threads[:2]:
            thread.start()
        wait_for(lambda: tight.health()["in_flight"] == 2, tight)
        threads[2].start()
        wait_for(lambda: tight.health()["queued"] == 1, tight)
        assert tight.health()["in_flight"] == 2 and not started[2].is_set()  # waiting: no response yet

        with pytest.raises(openai.RateLimitError) as refused:
            tight.client().completions.create(model=MODEL, prompt="one more", max_tokens=2)
    finally:
        paused.unlink()

    response = refused.value.response
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert "2 sequences in flight and 1 waiting" in refused.value.body["message"]
    for thread in threads:
        thread.join(300)
    assert len(results) == 3  # the queued request was served once a slot freed
    assert tight.metric("planc_rejected_requests_total") == 1


def test_an_exception_inside_one_request_fails_only_that_request(tight):
    import openai

    client = tight.client()
    faulty = POISON + [20, 21]  # its first token is chosen; choosing the second raises
    good = "The quick brown fox"
    expected = complete(client, good, 12)[1]
    outcomes = {}

    def run(name, call):
        try:
            outcomes[name] = call()
        except openai.APIError as exc:
            outcomes[name] = exc

    calls = {
        "faulty": lambda: complete(client, faulty, 8),
        "good": lambda: complete(client, good, 12),
    }
    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    with pytest.raises(openai.APIError, match="injected fault"):
        complete(client, faulty, 8, stream=True)  # streaming: the first token came, then an error event

    assert isinstance(outcomes["faulty"], openai.InternalServerError)
    assert "generation failed: RuntimeError: injected fault" in outcomes["faulty"].message
    assert outcomes["good"][1] == expected
    assert tight.health()["status"] == "ok"
    assert complete(client, good, 12)[1] == expected


def test_sigterm_stops_accepting_finishes_in_flight_and_exits_0(tight):
    started = [threading.Event() for _ in range(2)]
    results: list[str] = []
    threads = [threading.Thread(target=hold, args=(tight, f"The KV cache {i}", 40, started[i], results))
               for i in range(2)]
    for thread in threads:
        thread.start()
    assert all(event.wait(120) for event in started)

    tight.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:  # the listening socket closes first
        try:
            socket.create_connection(("127.0.0.1", tight.port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    for thread in threads:
        thread.join(120)

    assert tight.process.wait(120) == 0, tight.log.read_text()
    assert len(results) == 2 and all(results)  # both streams ran to their end ([DONE] ends the iteration)


# ---------------------------------------------------------------------- like planc run


def test_serve_refuses_drift_exactly_like_run(tiny_model, tmp_path):
    from click.testing import CliRunner

    from planc.cli import main

    lock = compile_plan(tmp_path, tiny_model, batch=2, seq=64, policy=", versions: exact")
    plan = load_lock(lock)
    other = plan.inputs.packages.model_copy(update={"transformers": "4.0.0"})
    lock.write_text(dump_lock(plan.model_copy(update={"inputs": plan.inputs.model_copy(
        update={"packages": other})}).sealed(), "test"))

    served = CliRunner().invoke(main, ["serve", str(lock), "--port", "0"])
    ran = CliRunner().invoke(main, ["run", str(lock), "-p", "hi"])

    assert served.exit_code == ran.exit_code == 1
    assert served.stderr == ran.stderr == (
        f"error: the machine does not match the plan: transformers version (policy exact): plan 4.0.0, machine "
        f"{plan.inputs.packages.transformers}\n"
    )


def test_serve_help_imports_no_heavy_library():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "planc", "serve", "--help"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert result.returncode == 0 and "--max-queue" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "accelerate", "starlette", "uvicorn", "prometheus_client"}


def test_a_taken_port_is_refused_before_loading(tiny_model, tmp_path):
    from click.testing import CliRunner

    from planc.cli import main

    lock = compile_plan(tmp_path, tiny_model, batch=2, seq=64)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = CliRunner().invoke(main, ["serve", str(lock), "--port", str(taken.getsockname()[1])])

    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot listen on 127.0.0.1:") and "pick another" in result.stderr


def test_a_tensor_parallel_plan_is_pointed_to_vllm():
    from click.testing import CliRunner

    from planc.cli import main

    result = CliRunner().invoke(main, ["serve", str(PLANS / "llama-3.1-70b-8xh100-tp.lock"), "--port", "0"])

    assert result.exit_code == 2
    assert result.stderr == ("error: planc serve runs a plan in one process; this one is tensor over 8 ranks: "
                             "serve it with vLLM (planc export --to vllm)\n")
