"""Process groups for TP/PP/CP/DP from `torchrun` / `srun` environment variables or arguments.

Rank discovery order: explicit arguments, then torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
then Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (master address = first host of
``SLURM_JOB_NODELIST`` unless ``MASTER_ADDR`` is set), else a single process. The backend is
NCCL with CUDA, gloo without (in which case :mod:`megatron_ext.cpu_compat` is enabled first).
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False

    def model_chunks(self) -> int | None:
        """Megatron's virtual_pipeline_model_parallel_size: None unless interleaving (one chunk
        per rank is the plain 1F1B schedule; megatron-core would run the interleaved one)."""
        return self.virtual_pipeline if (self.virtual_pipeline or 1) > 1 else None

    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        mp = self.model_parallel_size()
        if world_size % mp:
            raise ValueError(f"world size {world_size} is not divisible by tensor x pipeline x context "
                             f"parallel = {mp}; change parallel.* or the number of ranks")
        return world_size // mp


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list (``node[01-04],gpu7`` -> ``node01``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        first = rng.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def discover_env(rank: int | None = None, world_size: int | None = None,
                 local_rank: int | None = None) -> DistEnv:
    env = os.environ
    if rank is None:
        if "RANK" in env:
            rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", 0))
        elif "SLURM_PROCID" in env:
            rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local_rank = int(env.get("SLURM_LOCALID", 0))
        else:
            rank, world_size, local_rank = 0, 1, 0
    world_size = 1 if world_size is None else world_size
    local_rank = rank if local_rank is None else local_rank
    addr = env.get("MASTER_ADDR")
    if addr is None:
        addr = first_slurm_host(env["SLURM_JOB_NODELIST"]) if "SLURM_JOB_NODELIST" in env else "127.0.0.1"
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    elif world_size == 1:
        from .multirank import free_port

        port = free_port()  # a lone process needs no agreed port; 29500 may be taken
    else:
        port = 29500
    return DistEnv(rank, world_size, local_rank, addr, port)


def initialize(parallel: ParallelConfig, *, seed: int = 1234, rank: int | None = None,
               world_size: int | None = None, local_rank: int | None = None,
               timeout_s: float = 1800) -> DistEnv:
    """Start (or reuse) the default process group and build Megatron's TP/PP/CP/DP groups.

    Seeds so that every TP rank builds identical master weights on CPU initialisation.
    """
    from megatron.core import parallel_state, tensor_parallel

    from . import cpu_compat

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.enable()
    if dist.is_initialized():
        denv = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", 0)))
    else:
        denv = discover_env(rank, world_size, local_rank)
        if cuda:
            torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
            rank=denv.rank, world_size=denv.world_size,
            timeout=datetime.timedelta(seconds=timeout_s))
    parallel.data_parallel(denv.world_size)  # raises with a clear message
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.model_chunks(),
        context_parallel_size=parallel.context_parallel,
    )
    _build_replica_group(parallel, denv.rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # On CPU the routed "CUDA" seed above differs per TP rank; reset the CPU generator so
    # every rank draws the same master weights (use_cpu_initialization slices them after).
    torch.manual_seed(seed)
    return denv


_REPLICA_GROUP = None


def _build_replica_group(parallel: ParallelConfig, rank: int) -> None:
    """The ranks that hold one model replica: TP x CP x PP (megatron's "model parallel" group
    leaves CP out, but CP ranks of one replica train on the same rows, so they must share one
    rollout and one engine). Same rank order as ``initialize_model_parallel``'s default."""
    global _REPLICA_GROUP
    from megatron.core import parallel_state

    if parallel.context_parallel == 1:
        _REPLICA_GROUP = parallel_state.get_model_parallel_group()
        return
    gen = parallel_state.RankGenerator(
        tp=parallel.tensor_parallel, ep=1, dp=parallel.data_parallel(dist.get_world_size()),
        pp=parallel.pipeline_parallel, cp=parallel.context_parallel, order="tp-cp-ep-dp-pp")
    for ranks in gen.get_ranks("tp-cp-pp"):
        group = dist.new_group(ranks)  # collective: every rank creates every group
        if rank in ranks:
            _REPLICA_GROUP = group


def collective_device(group=None) -> torch.device:
    """Where a tensor must live to take part in a collective over ``group``: the current CUDA
    device for NCCL, the CPU for gloo. Host-side bookkeeping (counts, flags, metric sums) is
    built on the CPU and moved here for the collective only."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def replica_group():
    """Process group of this rank's model replica (TP x CP x PP ranks with one DP rank)."""
    if _REPLICA_GROUP is None:
        raise RuntimeError("megatron_ext.parallel.initialize() has not been called")
    return _REPLICA_GROUP


def destroy() -> None:
    global _REPLICA_GROUP
    from megatron.core import parallel_state

    _REPLICA_GROUP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
