"""Step statistics and losses on 2 gloo ranks, each holding half the groups, equal the
single-process result (spec "Notation"; issue 3, "Distributed"). One spawn for everything."""

import torch
import torch.distributed as dist

from megatron_ext.multirank import run_ranks
from pipeline.algorithms import (copo_advantages, get_preset, jepo_advantages,
                                 jepo_format_advantages, jepo_normalize, reinforce_pp_advantages,
                                 step_denominators)
from tests.algorithms.synthetic import (CASES, entropy_of, make_step, policy_logprobs,
                                        prompt_slice)


def compute(step, logprobs, group=None):
    """Every group-aware statistic and every preset's loss on ``step``; with ``group`` the
    statistics span all ranks. Tensors only, so the result pickles back from a rank."""
    ell = torch.where(step.answer_mask, step.old_logprobs, 0.0).sum(dim=1).view(step.rewards.shape)
    denom = step_denominators(step.mask, group)
    out = {
        "num_tokens": denom.num_tokens, "num_seqs": denom.num_seqs,
        "reinforce_pp": reinforce_pp_advantages(step.rewards, step.mask, group=group),
        "copo": torch.stack(copo_advantages(step.rewards, step.answer_ids, group=group)),
        "copo_scaled": copo_advantages(step.rewards, step.answer_ids, consistency_reward=True,
                                       group=group)[1],
        "jepo": jepo_normalize(jepo_advantages(ell, step.valid), step.valid, group=group),
        "jepo_format": jepo_format_advantages(step.formatted, group=group),
    }
    for index, (name, overrides) in enumerate(CASES):
        algo = get_preset(name, **overrides)
        terms = algo.advantages(step, group)
        logp = logprobs.detach().clone().requires_grad_()
        loss, metrics = algo.loss(logp, terms, algo.denominators(terms, group),
                                  entropy=entropy_of(logp))
        loss.backward()
        out[f"{index}:{name}"] = (loss.detach(), logp.grad, terms.advantages,
                                  {k: v for k, v in metrics.items()})
    return out


def _rank(rank, world_size, step, logprobs):
    half = step.rewards.shape[0] // world_size
    prompts = slice(rank * half, (rank + 1) * half)
    rows = slice(prompts.start * step.group_size, prompts.stop * step.group_size)
    return compute(prompt_slice(step, prompts), logprobs[rows], group=dist.group.WORLD)


def test_two_ranks_with_half_the_groups_each_equal_one_process():
    step = make_step(prompts=6)
    logprobs = policy_logprobs(step).detach()
    single = compute(step, logprobs)
    ranks = run_ranks(_rank, 2, step, logprobs, timeout=120)

    for key in ("num_tokens", "num_seqs"):
        for rank in ranks:
            torch.testing.assert_close(rank[key], single[key])
    for key in ("reinforce_pp", "jepo", "jepo_format", "copo_scaled"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), single[key])
    torch.testing.assert_close(torch.cat([r["copo"] for r in ranks], dim=1), single["copo"])

    for key in (k for k in single if ":" in k):
        loss, grad, adv, metrics = single[key]
        parts = [r[key] for r in ranks]
        torch.testing.assert_close(sum(p[0] for p in parts), loss, msg=key)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), grad, msg=key)
        torch.testing.assert_close(torch.cat([p[2] for p in parts]), adv, msg=key)
        for name, value in metrics.items():
            torch.testing.assert_close(sum(p[3][name] for p in parts), value, msg=key + name)
