"""Efficient Probing: fast form == direct form, uniform queries, shape checks, ep_all."""

import pytest
import torch

import epviz.probes as probes
from epviz.probes import Probe
from epviz.probes.ep import EfficientProbe


def tokens(b=4, n=16, d=64, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, p, d, generator=g)


def manual_ep(probe: EfficientProbe, keys: torch.Tensor) -> torch.Tensor:
    """The method's equations written out query by query."""
    m, c = probe.num_queries, probe.slice_width
    attn = torch.softmax(probe.queries @ keys.transpose(1, 2) / probe.dim**0.5, dim=-1)  # (B, M, L)
    v = keys @ probe.value.weight.T  # (B, L, D_o)
    return torch.cat([attn[:, j : j + 1] @ v[:, :, j * c : (j + 1) * c] for j in range(m)], dim=-1).squeeze(1)


@pytest.mark.parametrize("num_queries,d_out", [(8, 1), (4, 2), (16, 4), (1, 1), (64, 1)])
def test_fast_equals_direct_and_the_equations(num_queries, d_out):
    patch, _ = tokens()
    probe = probes.build("ep", 64, 7, num_queries=num_queries, d_out=d_out, seed=1)
    fast, direct = probe.pooled(patch), probe.pool_direct(patch)
    assert fast.shape == (4, 64 // d_out)
    assert torch.allclose(fast, direct, atol=1e-5)
    assert torch.allclose(fast, manual_ep(probe, patch), atol=1e-5)


def test_fast_equals_direct_at_vit_b_shape():
    g = torch.Generator().manual_seed(0)
    patch = torch.randn(2, 196, 768, generator=g)
    probe = probes.build("ep", 768, 1000, seed=0)
    assert torch.allclose(probe.pooled(patch), probe.pool_direct(patch), atol=1e-5)


def test_uniform_query_gives_mean_value_slice():
    patch, _ = tokens()
    probe = probes.build("ep", 64, 7, num_queries=8, seed=2).eval()
    c = probe.slice_width
    base = probe.pooled(patch)
    for j in (0, 5):
        y = probe.pooled(patch, uniform=[j])
        mean_v = (patch @ probe.value.weight.T).mean(dim=1)[:, j * c : (j + 1) * c]
        assert torch.allclose(y[:, j * c : (j + 1) * c], mean_v, atol=1e-6)
        keep = torch.ones(probe.width, dtype=torch.bool)
        keep[j * c : (j + 1) * c] = False
        assert torch.equal(y[:, keep], base[:, keep])
        assert torch.allclose(probe.pool_direct(patch, uniform=[j]), y, atol=1e-5)
    both = probe.pooled(patch, uniform=[0, 5])
    assert torch.allclose(both[:, :c], probe.pooled(patch, uniform=0)[:, :c])


def test_parameters_and_initialisation():
    probe = probes.build("ep", 768, 1000, num_queries=32, d_out=2, seed=0)
    assert probe.queries.shape == (32, 768)
    assert abs(probe.queries.std().item() - 0.02) < 1e-3 and abs(probe.queries.mean().item()) < 1e-3
    assert isinstance(probe.value, torch.nn.Linear) and probe.value.bias is None
    assert probe.value.weight.shape == (384, 768)
    assert probe.width == 384 and probe.num_predictors == 32 and probe.slice_width == 12
    assert probe.predictor_slices()[3] == slice(36, 48)


def test_divisibility_is_checked_at_build_with_valid_choices():
    with pytest.raises(
        ValueError, match=r"divisible by d_out\*num_queries.*valid num_queries: \[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64,"
    ):
        probes.build("ep", 768, 10, num_queries=40)
    with pytest.raises(
        ValueError, match=r"With d_out=2, valid num_queries: \[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 384\]"
    ):
        probes.build("ep", 768, 10, num_queries=256, d_out=2)
    with pytest.raises(ValueError, match=r"d_out=5 must divide D=768; valid d_out: \[1, 2, 3, 4, 6, 8,"):
        probes.build("ep", 768, 10, d_out=5)
    with pytest.raises(ValueError, match="valid num_queries"):
        probes.build("ep_all", 64, 10, num_queries=0)


def test_ep_all_attends_to_prefix_and_renormalises():
    patch, prefix = tokens(p=2)
    probe = probes.build("ep_all", 64, 7, num_queries=8, seed=3).eval()
    keys = torch.cat([patch, prefix], dim=1)
    full = torch.softmax(probe.queries @ keys.transpose(1, 2) / 8.0, dim=-1)  # sqrt(64) = 8
    maps, mass = probe.attention(patch, prefix), probe.prefix_mass(patch, prefix)
    assert torch.allclose(mass, full[..., 16:].sum(-1), atol=1e-6)
    assert torch.allclose(maps, full[..., :16] / full[..., :16].sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(probe.pooled(patch, prefix), manual_ep(probe, keys), atol=1e-5)
    assert torch.allclose(probe.pooled(patch, prefix), probe.pool_direct(patch, prefix), atol=1e-5)
    # uniform over all N + P keys: the mean value of the query's slice over patch and prefix tokens
    c = probe.slice_width
    y = probe.pooled(patch, prefix, uniform=[2])
    mean_v = (keys @ probe.value.weight.T).mean(dim=1)[:, 2 * c : 3 * c]
    assert torch.allclose(y[:, 2 * c : 3 * c], mean_v, atol=1e-6)


def test_ep_all_needs_prefix_tokens():
    patch, _ = tokens()
    probe = probes.build("ep_all", 64, 7, num_queries=8)
    with pytest.raises(ValueError, match="reads the prefix tokens"):
        probe(patch)


def test_ep_ignores_prefix_tokens():
    patch, prefix = tokens()
    probe = probes.build("ep", 64, 7, num_queries=8).eval()
    assert torch.equal(probe(patch, prefix), probe(patch))


def test_bf16_autocast_runs():
    patch, _ = tokens()
    probe = probes.build("ep", 64, 7, num_queries=8).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = probe(patch)
    assert torch.allclose(logits.float(), probe(patch), atol=0.1)


def test_feature_mask_drives_captum_layer_feature_ablation():
    """Ablating query j's slice of hook_pooled with captum equals zeroing those columns by hand."""
    from captum.attr import LayerFeatureAblation

    patch, _ = tokens()
    probe = probes.build("ep", 64, 7, num_queries=4, seed=0).eval()
    mask = probe.feature_mask()
    assert mask.tolist() == [[j for j in range(4) for _ in range(16)]]
    target = 2
    attr = LayerFeatureAblation(lambda x: probe(x), probe.hook_pooled).attribute(patch, target=target, layer_mask=mask)
    assert attr.shape == (4, probe.width)
    with torch.no_grad():
        pooled = probe.pooled(patch)
        full = probe.head(probe.norm(pooled))[:, target]
        for cols in probe.predictor_slices():
            ablated = pooled.clone()
            ablated[:, cols] = 0
            drop = full - probe.head(probe.norm(ablated))[:, target]
            assert torch.allclose(attr[:, cols], drop[:, None].expand(-1, 16), atol=1e-5)


@pytest.mark.parametrize("name,d_out", [("ep", 1), ("ep", 2), ("ep_all", 1), ("ep_all", 2)])
def test_ablation_shortcut_equals_the_per_query_loop(name, d_out):
    patch, prefix = tokens(p=2)
    probe = probes.build(name, 64, 7, num_queries=8, d_out=d_out, seed=4).eval()
    with torch.no_grad():
        probe.norm.running_mean.normal_()
        probe.norm.running_var.uniform_(0.5, 2.0)
        assert probe.fast_ablation
        full, ablated = probe.ablated_logits(patch, prefix)
        ref_full, ref_ablated = Probe.ablated_logits(probe, patch, prefix)
    assert ablated.shape == (8, 4, 7)
    assert torch.allclose(full, ref_full, atol=1e-6)
    assert torch.allclose(ablated, ref_ablated, atol=1e-6)
    assert not torch.allclose(ablated[0], full, atol=1e-4)


@pytest.mark.parametrize("point", ["hook_attn", "hook_pooled"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_hook_disables_the_ablation_shortcut(point, kind):
    patch, _ = tokens()
    probe = probes.build("ep", 64, 7, num_queries=8, seed=0).eval()
    module = getattr(probe, point)
    if kind == "forward":
        handle = module.register_forward_hook(lambda m, i, o: o * 1.5)
    else:
        handle = module.register_forward_pre_hook(lambda m, i: (i[0] * 1.5,))
    try:
        assert not probe.fast_ablation
        with torch.no_grad():
            full, ablated = probe.ablated_logits(patch)
            assert torch.allclose(ablated[3], probe(patch, uniform=[3]), atol=1e-6)
            assert torch.allclose(full, probe(patch), atol=1e-6)
    finally:
        handle.remove()
    assert probe.fast_ablation


def test_training_mode_and_overridden_pooling_disable_the_ablation_shortcut():
    probe = probes.build("ep", 64, 7, num_queries=8)
    assert not probe.train().fast_ablation
    assert probe.eval().fast_ablation

    class ScaledPooling(EfficientProbe):
        def _pool(self, patch, prefix, uniform):
            out = super()._pool(patch, prefix, uniform)
            return out._replace(features=2 * out.features)

    scaled = ScaledPooling(64, 7, num_queries=8).eval()
    assert not scaled.fast_ablation
    patch, _ = tokens()
    with torch.no_grad():
        _, ablated = scaled.ablated_logits(patch)
        assert torch.allclose(ablated[1], scaled(patch, uniform=[1]), atol=1e-6)


def test_probes_without_the_shortcut_report_it():
    assert not probes.build("mhca", 64, 7).eval().fast_ablation
    assert not probes.build("simpool", 64, 7).eval().fast_ablation


def test_ep_all_prefix_keys_every_prefix_token_by_default():
    patch, prefix = tokens(p=5)
    probe = probes.build("ep_all", 64, 7, num_queries=8, seed=0)
    assert probe.prefix == "all" and "prefix" not in probe.config
    assert torch.allclose(probe.pooled(patch, prefix), manual_ep(probe, torch.cat([patch, prefix], 1)), atol=1e-5)


@pytest.mark.parametrize("choice", ["first", "mean"])
def test_ep_all_can_key_the_first_or_the_mean_prefix_token(choice):
    patch, prefix = tokens(p=5)  # [CLS] + 4 registers
    probe = probes.build("ep_all", 64, 7, num_queries=8, prefix=choice, seed=0)
    default = probes.build("ep_all", 64, 7, num_queries=8, seed=0)
    assert probe.config["prefix"] == choice and sorted(probe.state_dict()) == sorted(default.state_dict())
    extra = prefix[:, :1] if choice == "first" else prefix.mean(dim=1, keepdim=True)  # DINOv2 / timm wrapper of the reference
    assert torch.allclose(probe.pooled(patch, prefix), default.pooled(patch, extra), atol=1e-6)
    assert torch.allclose(probe.pooled(patch, prefix), manual_ep(probe, torch.cat([patch, extra], 1)), atol=1e-5)
    assert probe.prefix_mass(patch, prefix).shape == (4, 8)
    with pytest.raises(ValueError, match=r"prefix must be one of \['all', 'first', 'mean'\]"):
        probes.build("ep_all", 64, 7, num_queries=8, prefix="cls")
    with pytest.raises(ValueError, match="does not take option"):
        probes.build("ep", 64, 7, prefix="mean")
