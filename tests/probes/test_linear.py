"""cls and gap: which prefix token LP reads ([CLS], or the mean of [CLS] and the registers)."""

import pytest
import torch

import epviz.probes as probes
from epviz.training.checkpoints import load_probe, save_probe


def tokens(b=4, n=16, d=32, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, p, d, generator=g)  # p = [CLS] + 4 registers


def test_cls_reads_the_first_prefix_token_by_default():
    patch, prefix = tokens()
    probe = probes.build("cls", 32, 3, seed=0)
    assert probe.prefix == "first" and "prefix" not in probe.config  # the default keeps the config of before
    assert torch.equal(probe.pooled(patch, prefix), prefix[:, 0])


def test_cls_can_average_every_prefix_token_as_the_reference_timm_wrapper():
    patch, prefix = tokens()
    probe = probes.build("cls", 32, 3, prefix="mean", seed=0)
    assert probe.config["prefix"] == "mean"
    assert torch.allclose(probe.pooled(patch, prefix), prefix.mean(dim=1))
    first = probes.build("cls", 32, 3, seed=0)
    assert torch.equal(first.pooled(patch, prefix[:, :1]), probe.pooled(patch, prefix[:, :1]))  # no registers: the same
    assert sorted(first.state_dict()) == sorted(probe.state_dict())


def test_the_prefix_option_survives_a_checkpoint(tmp_path):
    patch, prefix = tokens()
    probe = probes.build("cls", 32, 3, prefix="mean", seed=0).eval()
    save_probe(probe, tmp_path / "cls")
    loaded = load_probe(tmp_path / "cls").eval()
    assert loaded.prefix == "mean"
    assert torch.allclose(loaded(patch, prefix), probe(patch, prefix))


def test_unknown_prefix_names_the_choices():
    with pytest.raises(ValueError, match=r"prefix must be one of \['first', 'mean'\]"):
        probes.build("cls", 32, 3, prefix="all")
    with pytest.raises(ValueError, match="does not take option"):
        probes.build("gap", 32, 3, prefix="mean")
