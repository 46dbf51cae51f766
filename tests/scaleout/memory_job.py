"""Rank job for the planner's memory test: build the tiny policy exactly as the trainer does,
take one optimizer step (so Adam's state exists), and measure what stays resident."""

from __future__ import annotations

import torch


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def resident_bytes(model, optimizer) -> dict[str, int]:
    """Parameters, DDP grad buffers and optimizer state (master weights + moments) of this rank."""
    params = {p.data_ptr(): _bytes(p) for chunk in model for p in chunk.parameters()}
    grads = sum(_bytes(b.grad_data) for chunk in model for b in chunk.buffers)
    model_storages = {p.untyped_storage().data_ptr() for chunk in model for p in chunk.parameters()}
    state, seen = 0, set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        tensors = [p for g in inner.param_groups for p in g["params"]]
        tensors += [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        for t in tensors:
            # fp32 "main" params that alias the model's own weights are not extra memory
            if t.untyped_storage().data_ptr() in model_storages or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            state += _bytes(t)
    return {"parameters": sum(params.values()), "gradients": grads, "optimizer state": state}


def measure_job(rank, world_size, hf_path, params_dtype, distributed):
    from megatron_ext.model import ModelConfig, build_transformer_config, load_hf_config, model_provider
    from megatron_ext.parallel import ParallelConfig, initialize
    from megatron_ext.train import OptimizerConfig, build_policy, lm_forward_step, train_step

    initialize(ParallelConfig(), seed=1)
    hf = load_hf_config(hf_path)
    mcfg = ModelConfig(hf_config=hf_path, params_dtype=params_dtype, make_vocab_size_divisible_by=8)
    tcfg = build_transformer_config(hf, mcfg)
    opt_cfg = OptimizerConfig(lr=1e-3, use_distributed_optimizer=distributed)
    model, optimizer = build_policy(model_provider(hf, tcfg, mcfg), tcfg, opt_cfg)
    gen = torch.Generator().manual_seed(rank)
    batches = [{"tokens": torch.randint(0, hf.vocab_size, (2, 17), generator=gen)} for _ in range(2)]
    res = train_step(model, optimizer, lm_forward_step(2, 2 * 2 * 16 * world_size), batches,
                     seq_length=16, micro_batch_size=2)
    assert res.update_successful
    return resident_bytes(model, optimizer)
