"""Job for the RL loss-path tests: one fixed batch of packed rows through
``megatron_ext.policy_step`` in several layouts on 2 gloo ranks."""

from __future__ import annotations

import torch

from .layouts import HF, _setup, gather_full, load_full

MODES = ("token-mean", "seq-mean-token-mean", "seq-ratio")


def make_rows(n=8, seed=3):
    from megatron_ext.packing import Row

    g = torch.Generator().manual_seed(seed)
    rows, adv = [], []
    for _ in range(n):
        p = int(torch.randint(2, 6, (1,), generator=g))
        r = int(torch.randint(1, 9, (1,), generator=g))
        toks = torch.randint(0, HF["vocab_size"], (p + r,), generator=g).tolist()
        rows.append(Row(tokens=toks, loss_start=p))
        adv.append(float(torch.randn(1, generator=g)))
    return rows, torch.tensor(adv)


def _loss_fn(mode, adv, num_tokens, num_seqs):
    from pipeline.algorithms import aggregate

    def loss_fn(row_ids, lp, ent, mask):
        a = adv[row_ids][:, None]
        if mode == "seq-ratio":
            # Non-linear in whole-sequence sums (like GSPO's sequence ratio): under CP it is
            # only right if every rank sees every token of the sequence.
            seq_mean = (lp * mask).sum(1) / mask.sum(1)
            loss = -(a[:, 0] * torch.exp(seq_mean)).sum() / num_seqs
            return loss, {"loss": loss}
        per_token = -a * lp
        loss = aggregate(per_token, mask, mode, num_tokens=num_tokens, num_seqs=num_seqs)
        return loss, {"loss": loss}

    return loss_fn


def _run(model, opt, rows, adv, mode, budget):
    from megatron.core import parallel_state as ps

    from megatron_ext.policy_step import policy_update

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(r, len(rows), dp))  # this DP rank's rows
    num_tokens = sum(x.n_scored for x in rows)
    fn = _loss_fn(mode, adv[mine], num_tokens, len(rows))
    res, metrics = policy_update(model, opt, [rows[i] for i in mine], fn, token_budget=budget,
                                 vocab_size=HF["vocab_size"])
    loss = torch.tensor(float(metrics.get("loss", 0.0)))
    torch.distributed.all_reduce(loss)  # over DP (and PP: only the last stage holds it)
    # TP and CP ranks each report the whole DP rank's loss.
    copies = ps.get_tensor_model_parallel_world_size() * ps.get_context_parallel_world_size()
    return float(loss) / copies, gather_full(model, "main_grad")


def rl_layouts_job(rank, world_size):
    from megatron_ext.policy_step import ReferenceWeights, compute_logprobs
    from megatron_ext.train import OptimizerConfig

    rows, adv = make_rows()
    opt = OptimizerConfig(lr=0.0, clip_grad=0.0)
    out = {}
    model, o, _ = _setup(tp=2, opt=opt)
    ref = gather_full(model, "data")
    for mode in MODES:
        out[f"ref_{mode}"] = _run(model, o, rows, adv, mode, budget=10_000)  # one micro-batch
        out[f"mb4_{mode}"] = _run(model, o, rows, adv, mode, budget=20)  # several micro-batches
    out["ref_one_row"] = _run(model, o, rows[:1], adv[:1], "seq-ratio", budget=10_000)
    # Step 0: the trainer's recomputed `old` and the reference model's `ref` log-probs agree
    # exactly when the weights are the same.
    refw = ReferenceWeights(model)
    old = compute_logprobs(model, rows, token_budget=25)
    with refw.active(model):
        refl = compute_logprobs(model, rows, token_budget=25)
    out["old_equals_ref"] = all(torch.equal(a, b) for a, b in zip(old, refl))
    out["old_lengths"] = [len(x) for x in old] == [r.n_scored for r in rows]
    # Packed vs padded: each row alone in its own micro-batch (budget 1) gives the same values.
    alone = compute_logprobs(model, rows, token_budget=1)
    out["packed_vs_alone"] = max(float((a - b).abs().max()) for a, b in zip(old, alone))

    for label, kw in (("tp1dp2", {}), ("tp2sp", dict(tp=2, sp=True)), ("pp2", dict(pp=2)),
                      ("pp2vpp2", dict(pp=2, vpp=2)), ("cp2", dict(cp=2))):
        model, o, _ = _setup(opt=opt, **kw)
        load_full(model, ref)
        for mode in MODES:
            out[f"{label}_{mode}"] = _run(model, o, rows, adv, mode, budget=30)
        if label == "pp2vpp2":
            # One row cannot fill the PP=2 micro-batches the interleaved schedule needs: the
            # second is a padding-only pack that must add nothing.
            out["pp2vpp2_one_row"] = _run(model, o, rows[:1], adv[:1], "seq-ratio", budget=10_000)
            one = compute_logprobs(model, rows[:1], token_budget=10_000)
            out["pp2vpp2_one_row_old"] = float((one[0] - old[0]).abs().max()) if len(one) == 1 else 1.0
        if label in ("cp2", "pp2vpp2"):
            # The no-grad pass returns whole rows on every rank, equal to the TP2 values
            # (under CP each rank holds two chunks of every row; under VPP every model chunk
            # of a rank sees every micro-batch).
            other = compute_logprobs(model, rows, token_budget=25)
            out[f"{label}_old"] = max(float((a - b).abs().max()) for a, b in zip(old, other))
            out[f"{label}_old_lengths"] = [len(x) for x in other] == [r.n_scored for r in rows]
    return out if rank == 0 else None


def rl_tp_cp_job(rank, world_size):
    """4 ranks: DP=4 (the reference) vs TP=2 with sequence parallelism x CP=2, where each
    sequence is padded to 2 * CP * TP and every TP rank holds a slice of each CP chunk; vs
    PP=2 x CP=2, where the stages exchange each CP rank's share of the pack; vs DP=2 x CP=2,
    where the denominators span both DP ranks while each row is split over CP; and vs
    PP=2 x VPP=2 x CP=2 (interleaved schedule, one layer per model chunk)."""
    from megatron_ext.train import OptimizerConfig

    rows, adv = make_rows()
    opt = OptimizerConfig(lr=0.0, clip_grad=0.0)
    out = {}
    model, o, _ = _setup(opt=opt)
    ref = gather_full(model, "data")
    for mode in MODES:
        out[f"dp4_{mode}"] = _run(model, o, rows, adv, mode, budget=30)
    for label, kw in (("tp2spcp2", dict(tp=2, sp=True, cp=2)), ("pp2cp2", dict(pp=2, cp=2)),
                      ("dp2cp2", dict(cp=2)), ("pp2vpp2cp2", dict(pp=2, vpp=2, cp=2))):
        model, o, _ = _setup(opt=opt, **kw)
        load_full(model, ref)
        for mode in MODES:
            out[f"{label}_{mode}"] = _run(model, o, rows, adv, mode, budget=30)
    return out if rank == 0 else None
