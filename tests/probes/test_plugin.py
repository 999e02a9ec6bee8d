"""A probe family registered in one file outside epviz (tests/plugins/toy_probe.py) joins every list."""

import pytest
import torch

import epviz
import epviz.probes as probes
import tests.probes.test_contract as contract
from epviz.probes import Pooled, register
from tests.plugins.toy_probe import ToyAttentionProbe
from tests.toy_tokens import PlainProbe


def test_the_plugin_family_is_registered():
    assert probes.probe_class("toy_attn") is ToyAttentionProbe
    assert ToyAttentionProbe.__module__ == "tests.plugins.toy_probe" and ToyAttentionProbe.name == "toy_attn"
    assert "toy_attn" in probes.available()
    assert "toy_attn" in probes.available(attentive=True) and "toy_attn" in probes.available(sliced=True)
    assert "toy_attn" in probes.available(variants=False) and "toy_attn" not in probes.available(attentive=False)


def test_the_plugin_variant_is_data():
    e = probes.entry("toy_attn_sharp")
    assert e.is_variant and e.family is ToyAttentionProbe and dict(e.options) == {"temperature": 0.5}
    assert "toy_attn_sharp" in probes.available() and "toy_attn_sharp" not in probes.available(variants=False)
    assert probes.build("toy_attn_sharp", 8, 3).temperature == 0.5


def test_the_contract_tests_cover_the_plugin():
    assert "toy_attn" in contract.ALL and "toy_attn_sharp" in contract.ALL
    assert "toy_attn" in contract.ATTENTIVE


def test_the_notebooks_probe_set_includes_the_plugin():
    assert "toy_attn" in epviz.Setting.full().probe_set()
    assert "toy_attn" in probes.standard_set()


def test_the_explorer_lists_the_plugin():
    from epviz.explorer import ExplorerModel

    model = ExplorerModel(backbones=["tiny-random"], sets={})
    assert "toy_attn" in model.specs and model.specs["toy_attn"] == {"name": "toy_attn"}
    assert model.specs["toy_attn_sharp"] == {"name": "toy_attn_sharp"}
    assert model.counts == {"extractions": 0, "trainings": 0, "tables": 0}


def test_the_plugin_probe_works():
    patch = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(0))
    probe = probes.build("toy_attn", 8, 3, seed=0).eval()
    attn = torch.softmax(patch @ probe.query / 8**0.5, dim=-1)
    assert torch.allclose(probe.attention(patch)[:, 0], attn, atol=1e-6)
    assert torch.allclose(probe.pooled(patch), torch.einsum("bn,bnd->bd", attn, patch), atol=1e-6)
    assert torch.allclose(probe.pooled(patch, uniform=[0]), patch.mean(dim=1), atol=1e-6)


class _Mean(PlainProbe):
    def _pool(self, patch, prefix, uniform):
        return Pooled(patch.mean(dim=1))


def test_a_taken_name_is_refused():
    with pytest.raises(ValueError, match=r"a probe named 'toy_attn' is already registered \(ToyAttentionProbe\)"):
        register("toy_attn")(_Mean)
    with pytest.raises(ValueError, match="a probe named 'toy_attn_sharp' is already registered"):
        register("toy_attn_sharp", "toy_attn", temperature=2.0)
    assert probes.probe_class("toy_attn") is ToyAttentionProbe
    assert probes.entry("toy_attn_sharp").options == {"temperature": 0.5}


def test_a_variant_with_an_option_its_family_lacks_is_refused():
    with pytest.raises(
        ValueError,
        match=r"variant 'toy_heads': family 'toy_attn' does not take option\(s\) \['heads'\]; "
        r"it accepts \['grid', 'temperature'\]",
    ):
        register("toy_heads", "toy_attn", heads=4)
    assert "toy_heads" not in probes.available()
    with pytest.raises(ValueError, match="unknown probe 'toy_atn'"):
        register("toy_x", "toy_atn", temperature=2.0)


def test_an_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown probe 'toy_atn'\. Did you mean 'toy_attn'") as err:
        probes.build("toy_atn", 8, 3)
    assert "toy_attn_sharp" in str(err.value)


def test_unregister_removes_variants_before_their_family():
    register("toy_mean")(_Mean)
    register("toy_mean_b", "toy_mean")
    try:
        with pytest.raises(ValueError, match=r"probe family 'toy_mean' still has the variant\(s\) \['toy_mean_b'\]"):
            probes.unregister("toy_mean")
        assert probes.unregister("toy_mean_b").name == "toy_mean_b"
    finally:
        probes.unregister("toy_mean")
    assert "toy_mean" not in probes.available() and "toy_mean_b" not in probes.available()
    with pytest.raises(ValueError, match="unknown probe 'toy_mean'"):
        probes.unregister("toy_mean")
