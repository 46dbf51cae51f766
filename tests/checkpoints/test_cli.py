"""How the converters find their ranks. Without a process group on CPU, run_conversion
spawns TP x PP gloo ranks and hands each its (rank, world size); the conversion itself runs
inside an existing group in the job of conftest (as it does under torchrun)."""

import torch.distributed as dist

from tools.convert_hf_to_megatron import parse_args, run_conversion


def rank_probe(rank, world_size, tag):
    return rank, world_size, dist.get_world_size(), tag


def test_run_conversion_spawns_tp_times_pp_ranks():
    assert not dist.is_initialized()
    assert run_conversion(rank_probe, 2, "x") == [(0, 2, 2, "x"), (1, 2, 2, "x")]


def test_defaults_keep_the_checkpoint_dtype_and_one_rank():
    args = parse_args(["--hf", "a", "--out", "b"])
    assert (args.tp, args.pp, args.dtype, args.force) == (1, 1, None, False)
