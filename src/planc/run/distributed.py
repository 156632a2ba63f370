"""Running a tensor- or pipeline-parallel plan: torch's launcher, one process per rank, each checked.

`planc run` on such a plan checks this node against the lock (packages, this node's GPUs, RAM,
model files), then starts the node's ranks with `python -m torch.distributed.run` and the rank
entry point `python -m planc.run.rank`, which runs `planc run` again inside each rank: there every
rank checks its own part of the machine (its GPU, its node's RAM, the files) before loading its
share with `DistributedConfig(tp_size=N)` or `(pp_size=N)`; all ranks seed with the plan's seed and
generate on the same inputs (SPMD); rank 0 alone prints, records and compares.

Several nodes: without --node-rank `planc run` prints the command for every node and stops; each
node then runs its command (`--node-rank K --master-addr HOST`).

transformers 5.23's pipeline split builds attention masks and positions from layer 0's cache,
which a later stage never fills, so padded batches decode wrongly on those stages. The ranks pass
generate a cache whose unowned layers answer with an owned layer's lengths (`StageCache`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from planc.errors import RunError, UsageError
from planc.plan import Plan

# Marks a process as a rank `planc run` launched for this plan (torchrun sets RANK and the rest).
RANK_MARKER = "PLANC_RANK_OF"
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class RankContext:
    """This process's place in the plan: global rank, rank within the node, node, world size."""

    rank: int
    local_rank: int
    node: int
    world_size: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def rank_context(plan: Plan) -> RankContext | None:
    """The rank this process is, when `planc run` launched it for `plan`; None in a plain process."""
    if os.environ.get(RANK_MARKER) != plan.plan_hash or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    expected = len(plan.parallel.ranks)
    if world != expected:
        raise RunError(f"the launcher started {world} ranks; the plan has {expected}")
    return RankContext(rank, int(os.environ.get("LOCAL_RANK", rank)), plan.parallel.ranks[rank].node, world)


def refuse_unrunnable(plan: Plan, lock_path: Path) -> None:
    """A plan only vLLM runs (tensor x pipeline) is exported, not run."""
    if plan.parallel.engine == "vllm":
        raise RunError(
            f"this plan is {plan.parallel.strategy} ({plan.parallel.tensor_parallel_size} x "
            f"{plan.parallel.pipeline_parallel_size} ranks), which transformers 5.23 cannot run; run it on vLLM: "
            f"planc export --to vllm {lock_path}"
        )


def node_count(plan: Plan) -> int:
    return len({rank.node for rank in plan.parallel.ranks})


def ranks_on(plan: Plan, node: int) -> list:
    return [rank for rank in plan.parallel.ranks if rank.node == node]


def run_arguments(
    prompts: list[str], prompt_file, max_new_tokens, as_json, record, expect, trust_remote_code: bool = False
) -> list[str]:
    """`planc run` options that reproduce a request (what each rank is given)."""
    args: list[str] = ["--trust-remote-code"] if trust_remote_code else []
    for prompt in prompts:
        args += ["--prompt", prompt]
    if prompt_file is not None:
        args += ["--prompts", str(Path(prompt_file).resolve())]
    if max_new_tokens is not None:
        args += ["--max-new-tokens", str(max_new_tokens)]
    if as_json:
        args.append("--json")
    if record is not None:
        args += ["--record", str(Path(record).resolve())]
    if expect is not None:
        args += ["--expect", str(Path(expect).resolve())]
    return args


def node_commands(plan: Plan, lock_path: Path, arguments: list[str]) -> list[str]:
    """The command each node runs, rank 0's node first (its address is the rendezvous)."""
    import shlex

    commands = []
    for node in range(node_count(plan)):
        command = ["planc", "run", str(lock_path), "--node-rank", str(node), "--master-addr", "NODE0_ADDRESS",
                   "--master-port", str(DEFAULT_MASTER_PORT)] + arguments
        count = len(ranks_on(plan, node))
        commands.append(f"node {node} ({count} rank{'' if count == 1 else 's'}): " + shlex.join(command))
    return commands


def launcher_command(plan: Plan, lock_path: Path, arguments: list[str], node: int, master_addr: str | None,
                     master_port: int | None, quiet: bool = False) -> list[str]:
    """torch's launcher for this node's ranks, each running the planc rank entry point."""
    nodes = node_count(plan)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(len(ranks_on(plan, node)))]
    if nodes == 1:
        command.append("--standalone")
    else:
        command += ["--nnodes", str(nodes), "--node-rank", str(node), "--master-addr", master_addr,
                    "--master-port", str(master_port or DEFAULT_MASTER_PORT)]
    return command + ["-m", "planc.run.rank"] + (["-q"] if quiet else []) + [str(Path(lock_path).resolve())] + arguments


def launch(plan: Plan, lock_path: Path, arguments: list[str], node_rank: int | None, master_addr: str | None,
           master_port: int | None, quiet: bool) -> int:
    """Check this node, start its ranks, wait; the exit code is the launcher's (rank 0's outcome)."""
    from planc.run.apply import applied_environment
    from planc.run.checks import check_machine

    refuse_unrunnable(plan, lock_path)
    nodes = node_count(plan)
    if nodes > 1 and (node_rank is None or master_addr is None):
        sys.stdout.write(
            f"{lock_path} runs on {nodes} nodes ({plan.parallel.strategy}, {len(plan.parallel.ranks)} ranks); "
            "run on each node, with NODE0_ADDRESS the address of node 0:\n"
        )
        for line in node_commands(plan, lock_path, arguments):
            sys.stdout.write(f"  {line}\n")
        raise UsageError("a multi-node plan runs one command per node: pass --node-rank and --master-addr")
    node = node_rank or 0
    if node >= nodes:
        raise UsageError(f"--node-rank {node}: the plan has nodes 0 to {nodes - 1}")
    with applied_environment(plan):
        check_machine(plan, lock_path.parent, node=node)
    env = dict(os.environ, **{RANK_MARKER: plan.plan_hash})
    # torchrun would set 1 thread per rank (and say so); share the node's cores among its ranks instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, len(ranks_on(plan, node))))))
    command = launcher_command(plan, lock_path, arguments, node, master_addr, master_port, quiet)
    completed = subprocess.run(command, env=env, check=False)
    return completed.returncode


def distributed_config(plan: Plan):
    from transformers.distributed import DistributedConfig

    parallel = plan.parallel
    if parallel.strategy == "tensor":
        return DistributedConfig(tp_size=parallel.tensor_parallel_size)
    return DistributedConfig(pp_size=parallel.pipeline_parallel_size)


def load_rank_model(plan: Plan, folder: Path, progress=None):
    """from_pretrained of this rank's share: transformers reads its shard of each tensor (shard on read)."""
    import torch

    from planc.run.load import _loading_display, model_class_and_config

    arguments = {
        "dtype": getattr(torch, plan.dtype),
        "attn_implementation": plan.attention.attn_implementation,
        "trust_remote_code": plan.model.trust_remote_code,
        "distributed_config": distributed_config(plan),
    }
    if plan.generation.experts_implementation:
        arguments["experts_implementation"] = plan.generation.experts_implementation
    # The class and config compile planned (resolved by `architectures` where the model_type is unknown).
    cls, config = model_class_and_config(plan, folder)
    with _loading_display(progress):
        try:
            return cls.from_pretrained(folder, config=config, **arguments)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise RunError(f"loading {plan.model.architecture} as rank failed: {exc}") from None


def rank_placement_mismatches(plan: Plan, model, context: RankContext) -> list[str]:
    """The loaded share against the lock: the TP size, or the stage's layers and where the rest went."""
    parallel = plan.parallel
    mismatches = []
    if parallel.strategy == "tensor":
        size = getattr(model, "_tp_size", None)
        if size != parallel.tensor_parallel_size:
            mismatches.append(f"tensor-parallel size after loading: plan {parallel.tensor_parallel_size}, model {size}")
    else:
        from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

        start, end = parallel.ranks[context.rank].layers
        layers = getattr(model, model.base_model_prefix).layers
        owned = [i for i, layer in enumerate(layers) if not isinstance(layer, PipelineIdentityLayer)]
        if owned != list(range(start, end)):
            shown = f"{owned[0]}-{owned[-1]}" if owned else "none"
            mismatches.append(f"rank {context.rank} layers after loading: plan {start}-{end - 1}, model {shown}")
    device = rank_device(plan, context)
    wrong = sorted({str(p.device) for p in model.parameters()} - {device})
    if wrong:
        mismatches.append(f"rank {context.rank} parameters on {', '.join(wrong)} instead of {device}")
    if str(model.dtype).removeprefix("torch.") != plan.dtype:
        mismatches.append(f"dtype: plan {plan.dtype}, loaded model {str(model.dtype).removeprefix('torch.')}")
    return mismatches


def rank_device(plan: Plan, context: RankContext) -> str:
    """Where this rank computes: its GPU (CUDA index = LOCAL_RANK, as transformers binds it) or the CPU."""
    device = plan.parallel.ranks[context.rank].device
    return f"cuda:{device}" if isinstance(device, int) else "cpu"


def structure_mismatches(plan: Plan, config: dict) -> list[str]:
    """The lock's ranks against what this transformers does with the model: TP plan, pipeline split."""
    from planc.errors import ModelError
    from planc.model import build_model_graph
    from planc.parallel.pipeline import pp_refusal, transformers_stage_ranges
    from planc.parallel.tensor import tp_refusal

    parallel = plan.parallel
    try:
        graph = build_model_graph(config, plan.dtype, plan.model.trust_remote_code)
    except ModelError as exc:
        return [f"model {plan.model.architecture}: plan builds it, machine's transformers cannot ({exc})"]
    if parallel.strategy == "tensor":
        refusal = tp_refusal(graph, parallel.tensor_parallel_size)
        return [f"tensor parallelism at {parallel.tensor_parallel_size}: {refusal}"] if refusal else []
    refusal = pp_refusal(graph, parallel.pipeline_parallel_size)
    if refusal:
        return [f"pipeline parallelism at {parallel.pipeline_parallel_size}: {refusal}"]
    ranges = transformers_stage_ranges(graph.shapes.num_layers, parallel.pipeline_parallel_size)
    planned = [tuple(rank.layers) for rank in parallel.ranks]
    if [tuple(r) for r in ranges] != planned:
        return [f"pipeline split: plan {planned}, this transformers splits {ranges}"]
    return []


def generate_kwargs(plan: Plan, model, context: RankContext) -> dict:
    """What generate needs on a pipeline stage: a cache that answers for the layers it does not own."""
    if plan.parallel.strategy != "pipeline":
        return {}
    start, end = plan.parallel.ranks[context.rank].layers
    return {"past_key_values": stage_cache(model.config, range(start, end))}


def stage_cache(config, owned: range):
    """A DynamicCache whose layers outside `owned` report the lengths of an owned layer of the same kind."""
    from transformers import DynamicCache

    class StageCache(DynamicCache):
        def __init__(self):
            super().__init__(config=config)
            self._stand_in = {}
            for index in range(len(self.layers)):
                if index in owned:
                    continue
                same_kind = [j for j in owned if self.is_sliding[j] == self.is_sliding[index]]
                if same_kind:
                    self._stand_in[index] = same_kind[0]

        def _owned(self, layer_idx: int) -> int:
            return self._stand_in.get(layer_idx, layer_idx)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(self._owned(layer_idx))

        def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
            return super().get_mask_sizes(query_length, self._owned(layer_idx))

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return super().get_query_offset(self._owned(layer_idx))

    return StageCache()


def finish() -> None:
    """Leave the process group cleanly (a destroyed group keeps torch from warning at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
