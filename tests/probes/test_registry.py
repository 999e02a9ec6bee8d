"""The registry, build options and input validation."""

import pytest
import torch

import epviz.probes as probes
from epviz.probes import register
from tests.toy_tokens import PlainProbe

EXPECTED = [
    "abmilp",
    "aim",
    "cae",
    "cait",
    "cbam",
    "clip",
    "cls",
    "coca",
    "dinovit",
    "dolg",
    "ep",
    "ep_all",
    "esimpool",
    "gap",
    "jepa",
    "mhca",
    "siglip",
    "simpool",
]
VARIANTS = {
    "ep16": ("ep", {"num_queries": 16}),
    "ep16_d2": ("ep", {"num_queries": 16, "d_out": 2}),
    "ep16_d4": ("ep", {"num_queries": 16, "d_out": 4}),
    "ep_all16": ("ep_all", {"num_queries": 16}),
}


def builtin(names):
    return [n for n in names if probes.probe_class(n).__module__.startswith("epviz.")]


def test_available_lists_every_probe():
    assert builtin(probes.available(variants=False)) == EXPECTED
    assert builtin(probes.available()) == sorted(EXPECTED + list(VARIANTS))
    assert builtin(probes.available(attentive=False)) == ["cls", "gap"]
    assert builtin(probes.available(sliced=True, variants=False)) == ["aim", "ep", "ep_all", "esimpool", "simpool"]


def test_each_family_lives_in_the_module_named_after_it():
    pairs = {"ep_all": "ep", "esimpool": "simpool", "cls": "linear", "gap": "linear"}
    for name in EXPECTED:
        assert probes.probe_class(name).__module__ == f"epviz.probes.{pairs.get(name, name)}"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_are_a_family_with_fixed_options(name):
    family, options = VARIANTS[name]
    e = probes.entry(name)
    assert e.is_variant and e.family is probes.probe_class(family) and dict(e.options) == options
    probe = probes.build(name, 64, 5, seed=0)
    assert probe.config == {**probes.build(family, 64, 5, **options).config}
    assert probes.build(name, 64, 5, num_queries=8).num_queries == 8  # build options override the variant's


def test_standard_set_has_one_name_per_family():
    standard = builtin(probes.standard_set())
    assert len(standard) == len(EXPECTED)
    assert "ep16" in standard and "ep_all16" in standard and "ep" not in standard and "mhca" in standard


@pytest.mark.parametrize(
    "typo,suggestion", [("ep_al", "'ep_all'"), ("mhcaa", "'mhca'"), ("simpol", "'simpool'"), ("CLS", "'cls'")]
)
def test_unknown_name_suggests_close_matches(typo, suggestion):
    with pytest.raises(ValueError, match="unknown probe") as err:
        probes.build(typo, 64, 10)
    assert f"Did you mean {suggestion}" in str(err.value)
    assert "Available probes: abmilp, aim," in str(err.value)


def test_unknown_name_without_close_match_lists_names():
    with pytest.raises(ValueError, match=r"unknown probe 'zzzz'\. Available probes: abmilp"):
        probes.build("zzzz", 64, 10)


def test_unknown_option_is_named():
    with pytest.raises(
        ValueError, match=r"does not take option\(s\) \['queries'\]; it accepts \['d_out', 'grid', 'num_queries'\]"
    ):
        probes.build("ep", 64, 10, queries=4)


def test_seed_makes_build_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = probes.build("mhca", 64, 10, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = probes.build("mhca", 64, 10, seed=7)
    c = probes.build("mhca", 64, 10, seed=8)
    assert torch.equal(a.query, b.query) and torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.query, c.query)


def test_register_adds_a_family_and_rejects_duplicates():
    @register("test_max_pool")
    class MaxPool(PlainProbe):
        def _pool(self, patch, prefix, uniform):
            from epviz.probes import Pooled

            return Pooled(patch.amax(dim=1))

    try:
        probe = probes.build("test_max_pool", 8, 3)
        assert probe.name == "test_max_pool" and probe(torch.randn(2, 4, 8)).shape == (2, 3)
        with pytest.raises(ValueError, match="already registered"):
            register("test_max_pool")(MaxPool)
    finally:
        probes.unregister("test_max_pool")
    assert "test_max_pool" not in probes.available()


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        probes.build("gap", 64, 0)
    with pytest.raises(ValueError, match=r"grid must be \(rows, cols\)"):
        probes.build("cbam", 64, 10, grid=(4,))


class TestInputValidation:
    probe = probes.build("ep", 64, 10, num_queries=8)

    def test_wrong_width_names_expected_and_received(self):
        with pytest.raises(ValueError, match="expects tokens of width D=64 but the patch tokens have D=32"):
            self.probe(torch.randn(2, 16, 32))
        with pytest.raises(ValueError, match="expects tokens of width D=64 but the prefix tokens have D=32"):
            self.probe(torch.randn(2, 16, 64), torch.randn(2, 1, 32))

    def test_wrong_ndim(self):
        with pytest.raises(ValueError, match=r"shape \(batch, tokens, dim\); got shape \(16, 64\) \(add a batch axis"):
            self.probe(torch.randn(16, 64))
        with pytest.raises(ValueError, match=r"got shape \(1, 2, 16, 64\)"):
            self.probe(torch.randn(1, 2, 16, 64))
        with pytest.raises(ValueError, match="prefix tokens must have shape"):
            self.probe(torch.randn(2, 16, 64), torch.randn(2, 64))
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            self.probe([[0.0]])

    def test_batch_mismatch_and_empty_tokens(self):
        with pytest.raises(ValueError, match="2 prefix token sets for a batch of 3"):
            self.probe(torch.randn(3, 16, 64), torch.randn(2, 1, 64))
        with pytest.raises(ValueError, match="got 0 patch tokens"):
            self.probe(torch.randn(3, 0, 64))

    def test_uniform_out_of_range(self):
        with pytest.raises(ValueError, match=r"has 8 attention predictors \(0..7\); uniform got \[8\]"):
            self.probe(torch.randn(2, 16, 64), uniform=[8])
        with pytest.raises(ValueError, match=r"uniform got \[-1\]"):
            self.probe(torch.randn(2, 16, 64), uniform=-1)


def test_cls_needs_prefix_tokens():
    probe = probes.build("cls", 64, 10)
    with pytest.raises(ValueError, match=r"probe 'cls' reads the prefix tokens \(\[CLS\] at index 0\) but none were given"):
        probe(torch.randn(2, 16, 64))
    with pytest.raises(ValueError, match="none were given"):
        probe(torch.randn(2, 16, 64), torch.randn(2, 0, 64))
    prefix = torch.randn(2, 3, 64)
    probe.eval()
    assert torch.equal(probe.pooled(torch.randn(2, 16, 64), prefix), prefix[:, 0])


@pytest.mark.parametrize("name", ["cls", "gap"])
def test_probes_without_predictors(name):
    probe = probes.build(name, 64, 10)
    assert probe.num_predictors == 0 and probe.predictor_slices() == [] and probe.feature_mask() is None
    with pytest.raises(ValueError, match=f"probe '{name}' has no attention predictors"):
        probe.attention(torch.randn(2, 16, 64), torch.randn(2, 1, 64))
    with pytest.raises(ValueError, match="has no attention predictors, so uniform=\\[0\\] cannot apply"):
        probe(torch.randn(2, 16, 64), torch.randn(2, 1, 64), uniform=[0])
