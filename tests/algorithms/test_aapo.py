"""AAPO: group advantage plus the clipped margin over paired reference rewards (spec 4, 8)."""

import torch

from pipeline.algorithms import aapo_advantages


def test_uniform_group_learns_from_the_margin_alone():
    adv = aapo_advantages(torch.tensor([[1.0, 1, 1, 1]]), torch.tensor([[0.0, 1, 0, 1]]))
    torch.testing.assert_close(adv, torch.tensor([[0.28, 0.0, 0.28, 0.0]]))


def test_worked_example_with_std_scaling():
    adv = aapo_advantages(torch.tensor([[1.0, 0, 0, 1]]), torch.tensor([[0.0, 0, 1, 1]]))
    torch.testing.assert_close(adv, torch.tensor([[1.145875, -0.865875, -1.065875, 0.865875]]),
                               atol=1e-5, rtol=0)


def test_worked_example_without_std_scaling():
    adv = aapo_advantages(torch.tensor([[1.0, 0, 0, 1]]), torch.tensor([[0.0, 0, 1, 1]]),
                          scale=False)
    torch.testing.assert_close(adv, torch.tensor([[0.78, -0.5, -0.7, 0.5]]))


def test_margins_are_configurable_and_asymmetric():
    adv = aapo_advantages(torch.tensor([[5.0], [-5.0]]), torch.zeros(2, 1), margin_low=0.1,
                          margin_high=0.3)
    torch.testing.assert_close(adv, torch.tensor([[0.3], [-0.1]]))
