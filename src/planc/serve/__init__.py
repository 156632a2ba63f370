"""`planc serve`: a plan as an OpenAI-compatible HTTP server that load cannot push out of memory.

`serve_plan` enacts the plan exactly as `planc run` does (`planc.run.open_session`: the same checks,
refusals and exit codes), proves the batched decoding exact on the loaded model, then serves until
SIGTERM or SIGINT: it stops accepting, finishes what is in flight and returns 0.

The package: `protocol` (OpenAI request/response models), `app` (HTTP routes), `scheduler`
(admission within the plan's batch_size, a bounded queue, the decode loop), `engine` (prefill and
decode steps), `invariant` (batched rows with single-sequence arithmetic), `text` (incremental
detokenization, stop strings), `metrics` (Prometheus).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from planc.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
QUEUE_PER_SLOT = 4  # default waiting queue: 4 x batch_size, so a queued request waits ~4 request times at most
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def default_max_queue(batch_size: int) -> int:
    return QUEUE_PER_SLOT * batch_size


def serve_plan(
    lock_path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_queue: int | None = None,
    model_name: str | None = None,
    batching: str = "exact",
    log_level: str = "warning",
    quiet: bool = False,
) -> int:
    """Serve the plan in `lock_path` until SIGTERM/SIGINT; returns the exit code (0 after a clean drain).

    Raises what `planc run` raises when the machine, packages or model files do not match the plan
    (DriftError, RunError, LockError), and UsageError for options that cannot work.
    """
    from planc.plan import load_lock
    from planc.run import open_session
    from planc.run.report import make_console

    lock_path = Path(lock_path)
    plan = load_lock(lock_path)
    if plan.distributed:
        raise UsageError(
            f"planc serve runs a plan in one process; this one is {plan.parallel.strategy} over "
            f"{len(plan.parallel.ranks)} ranks: serve it with vLLM (planc export --to vllm)"
        )
    if plan.workload.source_tokens:
        raise UsageError(
            f"planc serve decodes decoder-only models; {plan.model.architecture} is an encoder-decoder model "
            "(its prompt goes to the encoder, and its batched decoding keeps cross-attention caches the server does "
            "not manage): generate with planc run"
        )
    outside = [f for f in (plan.mixers.families if plan.mixers else ()) if not _state_in_cache(f)]
    if outside:
        raise UsageError(
            f"planc serve keeps one cache per sequence, and this model's {', '.join(outside)} layers keep their "
            "state outside it (on the modules or in a state the forward returns), so concurrent sequences "
            "would share it: generate with planc run"
        )
    if batching not in ("exact", "fast"):
        raise UsageError(f"--batching must be exact or fast, not {batching!r}")
    if log_level not in LOG_LEVELS:
        raise UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    if max_queue is None:
        max_queue = default_max_queue(plan.workload.batch_size)
    if max_queue < 0:
        raise UsageError(f"--max-queue must be 0 or more, not {max_queue}")
    name = model_name or served_name(plan)
    # Bound (not yet listening) before the weights load: a taken port fails now, not after the load.
    listener = _bind(host, port)
    console = make_console()
    with listener, open_session(plan, lock_path.parent, None if quiet else console) as session:
        from planc.model.graph import generates_from_images

        if generates_from_images(session.model):
            raise UsageError(
                f"planc serve takes text prompts, and {type(session.model).__name__} generates only from an image "
                "(its generate requires pixel_values): use planc run --image"
            )
        return _serve(session, listener, name, max_queue, batching, log_level)


def _state_in_cache(family: str) -> bool:
    from planc.model.cache import family_mixer

    mixer = family_mixer(family)
    return mixer is None or mixer.state_in_cache


def served_name(plan) -> str:
    """The model's name in the API: its hub id, else its folder's name, else its architecture."""
    if plan.model.id:
        return plan.model.id
    if plan.model.path:
        return Path(plan.model.path).name
    return plan.model.architecture


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --host/--port") from None
    return listener


def _serve(session, listener: socket.socket, name: str, max_queue: int, batching: str, log_level: str) -> int:
    import signal
    import time

    import uvicorn

    from planc.serve.app import Served, build_app
    from planc.serve.engine import Engine
    from planc.serve.metrics import Metrics
    from planc.serve.scheduler import Scheduler
    from planc.serve.text import GuardedTokenizer

    plan = session.plan
    batch_size = plan.workload.batch_size
    tokenizer = GuardedTokenizer(session.tokenizer)
    engine = Engine(session.model, tokenizer, plan, batching)
    how = engine.prove_batching(batch_size)
    metrics = Metrics(batch_size, max_queue, name, plan.plan_hash)
    scheduler = Scheduler(engine, batch_size, max_queue, metrics)
    metrics.watch(scheduler.counts)
    served = Served(name, plan, tokenizer, scheduler, metrics, how, int(time.time()))
    config = uvicorn.Config(
        build_app(served), log_level=log_level, access_log=log_level in ("info", "debug"), lifespan="on",
        timeout_graceful_shutdown=None,
    )
    server = uvicorn.Server(config)

    # uvicorn handles SIGTERM/SIGINT while it serves (stop accepting, drain) and afterwards re-raises
    # the signal to the handler that was there before; this one makes that a no-op, so a drained
    # server exits 0 instead of dying of the re-raised signal.
    def drain(signum, frame):
        server.should_exit = True

    previous = {sig: signal.signal(sig, drain) for sig in (signal.SIGTERM, signal.SIGINT)}
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(
        f"serving {name} on http://{shown}:{port}/v1 (plan {plan.plan_hash[:19]}): {batch_size} sequences in "
        f"flight, {max_queue} queued, max_seq_len {plan.workload.max_seq_len}; decoding {how}\n"
    )
    sys.stdout.flush()
    try:
        server.run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
