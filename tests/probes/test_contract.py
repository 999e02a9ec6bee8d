"""Every registered probe obeys the probe contract (shapes, maps, uniform, hooks, training)."""

import pytest
import timm
import torch
from torch import nn

import epviz.probes as probes
from epviz.probes import Probe

D, C, GRID = 64, 5, (4, 4)
N = GRID[0] * GRID[1]
# Every registered name, families and variants, including families registered outside epviz (tests/plugins).
ALL = probes.available()
ATTENTIVE = probes.available(attentive=True)
# Parameters the reference designs hold but never use in the forward pass (documented in each class), by family.
DEAD = {"cae": {"unused_norm.weight", "unused_norm.bias"}}
# Families whose predictors also attend to keys that are not patch tokens.
EXTRA_KEY_FAMILIES = {"ep_all", "clip", "cait"}
EXTRA_KEYS = [n for n in ATTENTIVE if probes.probe_class(n).name in EXTRA_KEY_FAMILIES]


def family(name: str) -> str:
    return probes.probe_class(name).name


def make(name: str, seed: int = 0) -> Probe:
    options = {"num_queries": 8} if name in ("ep", "ep_all") else {}
    return probes.build(name, D, C, grid=GRID, seed=seed, **options)


@pytest.fixture(scope="module")
def vit_tokens():
    """Patch and prefix tokens of timm's test_vit (D=64) on 64x64 images: a 4x4 grid, one [CLS]."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False).eval()
        images = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        ((patch, prefix),) = model.forward_intermediates(
            images,
            indices=[len(model.blocks) - 1],
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
    assert patch.shape == (6, N, D) and prefix.shape == (6, 1, D)
    return patch, prefix


def capture(probe: Probe, point: str, *args, **kwargs):
    seen = []
    handle = getattr(probe, point).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        logits = probe(*args, **kwargs)
    finally:
        handle.remove()
    return logits, seen[-1] if seen else None


@pytest.mark.parametrize("name", ALL)
def test_structure_and_forward(name, vit_tokens):
    patch, prefix = vit_tokens
    probe = make(name).eval()
    assert isinstance(probe.norm, nn.BatchNorm1d) and not probe.norm.affine and probe.norm.eps == 1e-6
    assert isinstance(probe.head, nn.Linear) and probe.head.out_features == C
    assert probe.norm.num_features == probe.width == probe.head.in_features
    assert probe.config["name"] == family(name) and probe.config["dim"] == D and probe.config["num_classes"] == C
    assert probes.entry(name).options.items() <= probe.config.items()
    logits, pooled = capture(probe, "hook_pooled", patch, prefix)
    assert logits.shape == (6, C) and torch.isfinite(logits).all()
    assert pooled.shape == (6, probe.width)
    assert torch.allclose(probe.pooled(patch, prefix), pooled)
    assert isinstance(probe, probes.probe_class(name)) and probe.name == family(name)


@pytest.mark.parametrize("name", ALL)
def test_config_rebuilds_same_probe(name):
    probe = make(name, seed=3)
    options = dict(probe.config)
    twin = probes.build(options.pop("name"), options.pop("dim"), options.pop("num_classes"), seed=3, **options)
    a, b = probe.state_dict(), twin.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ATTENTIVE)
def test_attention_rows_are_distributions(name, vit_tokens):
    patch, prefix = vit_tokens
    probe = make(name).eval()
    maps = probe.attention(patch, prefix)
    assert maps.shape == (6, probe.num_predictors, N)
    assert probe.num_predictors >= 1
    assert (maps >= 0).all()
    assert torch.allclose(maps.sum(-1), torch.ones(6, probe.num_predictors), atol=1e-5)
    mass = probe.nonpatch_mass(patch, prefix)
    assert mass.shape == (6, probe.num_predictors)
    if name in EXTRA_KEYS:
        assert ((mass > 0) & (mass < 1)).all()
    else:
        assert (mass == 0).all()


@pytest.mark.parametrize("name", ATTENTIVE)
def test_uniform_changes_exactly_that_predictor(name, vit_tokens):
    patch, prefix = vit_tokens
    probe = make(name).eval()
    k = probe.num_predictors
    with torch.no_grad():
        base_logits, base_maps = capture(probe, "hook_attn", patch, prefix)
        for j in sorted({0, k - 1}):
            logits, maps = capture(probe, "hook_attn", patch, prefix, uniform=[j])
            assert torch.allclose(maps[:, j], torch.full((6, N), 1.0 / N), atol=1e-6)
            others = [i for i in range(k) if i != j]
            assert torch.allclose(maps[:, others], base_maps[:, others], atol=1e-6)
            assert not torch.equal(logits, base_logits)
        assert torch.equal(probe(patch, prefix, uniform=[]), base_logits)


@pytest.mark.parametrize("name", [n for n in ATTENTIVE if n not in EXTRA_KEYS])
def test_hook_attn_edits_reach_the_logits(name, vit_tokens):
    """For in-path hooks, forcing row j to 1/N through the hook equals uniform=[j]."""
    patch, prefix = vit_tokens
    probe = make(name).eval()
    j = probe.num_predictors - 1

    def flatten_row(module, inputs, output):
        output = output.clone()
        output[:, j] = 1.0 / output.shape[-1]
        return output

    with torch.no_grad():
        handle = probe.hook_attn.register_forward_hook(flatten_row)
        edited = probe(patch, prefix)
        handle.remove()
        reference = probe(patch, prefix, uniform=[j])
        plain = probe(patch, prefix)
    if probe.attn_hook_in_path:
        assert torch.allclose(edited, reference, atol=1e-5)
    else:
        assert torch.equal(edited, plain)


@pytest.mark.parametrize("name", EXTRA_KEYS)
def test_hook_attn_in_path_with_extra_keys(name, vit_tokens):
    patch, prefix = vit_tokens
    probe = make(name).eval()
    with torch.no_grad():
        plain = probe(patch, prefix)
        handle = probe.hook_attn.register_forward_hook(lambda m, i, o: o.clone())
        same = probe(patch, prefix)
        handle.remove()
        handle = probe.hook_attn.register_forward_hook(lambda m, i, o: torch.full_like(o, 1.0 / o.shape[-1]))
        edited = probe(patch, prefix)
        handle.remove()
    assert torch.allclose(same, plain, atol=1e-6)
    assert not torch.allclose(edited, plain, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_trains_a_few_steps(name, vit_tokens):
    patch, prefix = vit_tokens
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    probe = make(name).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(probe(patch, prefix), labels)
        opt.zero_grad()
        loss.backward()
        if not losses:
            no_grad = {n for n, p in probe.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
            assert no_grad == DEAD.get(family(name), set())
            if family(name) == "coca":  # only query 0 reaches the output
                assert probe.queries.grad[0].abs().sum() > 0 and (probe.queries.grad[1:] == 0).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ALL)
def test_declared_capabilities_match_the_probe(name):
    cls, probe = probes.probe_class(name), make(name)
    assert cls.attentive == (probe.num_predictors > 0)
    assert cls.sliced == (probe.feature_mask() is not None)
    assert (name in ATTENTIVE) == cls.attentive
    assert (name in probes.available(sliced=True)) == cls.sliced


@pytest.mark.parametrize("name", ALL)
def test_predictor_slices_partition_the_pooled_feature(name):
    probe = make(name)
    slices = probe.predictor_slices()
    assert len(slices) == probe.num_predictors
    mask = probe.feature_mask()
    if not type(probe).sliced:
        assert mask is None and all(s is None for s in slices)
        return
    assert probe.num_predictors > 0
    assert mask.shape == (1, probe.width) and mask.dtype == torch.long
    owner = torch.full((probe.width,), -1)
    for j, cols in enumerate(slices):
        assert isinstance(cols, slice) and cols.stop > cols.start
        assert (owner[cols] == -1).all(), f"predictor {j}'s columns overlap another's"
        owner[cols] = j
    assert (owner >= 0).all(), "some pooled columns belong to no predictor"
    assert torch.equal(mask[0], owner)


@pytest.mark.parametrize("name", ALL)
def test_ablated_logits_equal_one_uniform_call_per_predictor(name, vit_tokens):
    patch, prefix = vit_tokens
    probe = make(name).eval()
    if not probe.num_predictors:
        with pytest.raises(ValueError, match="has no attention predictors, so there is nothing to ablate"):
            probe.ablated_logits(patch, prefix)
        return
    with torch.no_grad():
        full, ablated = probe.ablated_logits(patch, prefix)
        assert full.shape == (6, C) and ablated.shape == (probe.num_predictors, 6, C)
        assert torch.allclose(full, probe(patch, prefix), atol=1e-6)
        for j in range(probe.num_predictors):
            assert torch.allclose(ablated[j], probe(patch, prefix, uniform=[j]), atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_random_tokens_and_other_batch_sizes(name):
    torch.manual_seed(0)
    probe = make(name).eval()
    for b in (1, 3):
        patch, prefix = torch.randn(b, N, D), torch.randn(b, 2, D)
        assert probe(patch, prefix).shape == (b, C)
        if probe.num_predictors:
            assert probe.attention(patch, prefix).shape == (b, probe.num_predictors, N)


# Families whose head is linear after the softmax: their evidence is exact; the others say they have none.
EVIDENCE_FAMILIES = {"ep", "ep_all", "gap", "cls", "mhca"}


@pytest.mark.parametrize("name", ALL)
def test_evidence_sums_exactly_to_the_logits_or_is_refused(name, vit_tokens):
    patch, prefix = vit_tokens
    probe = make(name)
    with torch.no_grad():
        probe.train()(patch * 2 + 1, prefix)  # running statistics away from (0, 1), so the mean's share matters
    probe.eval()
    if family(name) not in EVIDENCE_FAMILIES:
        with pytest.raises(NotImplementedError, match="no exact per-token evidence"):
            probe.evidence(patch, prefix)
        return
    with torch.no_grad():
        evidence, logits = probe.evidence(patch, prefix), probe(patch, prefix)
    k = max(probe.num_predictors, 1)
    assert evidence.patch.shape == (6, C, k, N) and evidence.other.shape == (6, C, k)
    torch.testing.assert_close(evidence.logits(), logits, atol=1e-5, rtol=0)
    if family(name) in ("gap", "ep"):
        assert evidence.other.abs().max() == 0, "a patch-only probe has nothing on other keys"
    if family(name) == "cls":
        assert evidence.patch.abs().max() == 0, "LP on [CLS] reads no patch token"
    with pytest.raises(RuntimeError, match="eval mode"):
        probe.train().evidence(patch, prefix)
