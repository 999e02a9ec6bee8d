"""Ablation controls on the probe: replace= (mean / shuffled maps), zero= (sliced probes), attention_rows."""

import pytest
import torch

import epviz.probes as probes
from epviz.probes import Pooled, Probe
from tests.toy_tokens import OneMapProbe

D, C, GRID = 64, 5, (4, 4)
N = GRID[0] * GRID[1]
ATTENTIVE = probes.available(attentive=True)
SLICED = set(probes.available(sliced=True))
EXTRA_KEY_FAMILIES = {"ep_all", "clip", "cait"}


def family(name: str) -> str:
    return probes.probe_class(name).name


def make(name: str, seed: int = 0) -> Probe:
    """A probe with peaked maps and non-trivial BatchNorm statistics, in eval mode."""
    options = {"num_queries": 8} if name in ("ep", "ep_all") else {}
    probe = probes.build(name, D, C, grid=GRID, seed=seed, **options)
    with torch.no_grad():
        if hasattr(probe, "queries"):
            probe.queries.mul_(40)
        probe.train()
        g = torch.Generator().manual_seed(5)
        probe(torch.randn(32, N, D, generator=g), torch.randn(32, 2, D, generator=g))
    return probe.eval()


@pytest.fixture(scope="module")
def toks():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, N, D, generator=g), torch.randn(6, 2, D, generator=g)


def hooked(probe: Probe, point: str, edit, *args, **kwargs):
    handle = getattr(probe, point).register_forward_hook(edit)
    try:
        return probe(*args, **kwargs)
    finally:
        handle.remove()


def hooked_output(probe: Probe, point: str, *args, **kwargs) -> torch.Tensor:
    seen = []
    hooked(probe, point, lambda m, i, o: seen.append(o.clone()), *args, **kwargs)
    return seen[-1]


@pytest.mark.parametrize("name", ATTENTIVE)
def test_attention_rows_average_to_the_maps(name, toks):
    probe = make(name)
    with torch.no_grad():
        rows = probe.attention_rows(*toks)
        maps = probe.attention(*toks)
    r = N if family(name) == "dinovit" else 1
    assert rows.shape == (6, probe.num_predictors, r, N)
    assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[:3]), atol=1e-5)
    assert torch.allclose(rows.mean(2), maps, atol=1e-6)


@pytest.mark.parametrize("name", ATTENTIVE)
def test_every_family_supports_replacement(name, toks):
    """Own rows change nothing; another image's rows change the logits; the loop equals ablated_logits."""
    probe = make(name)
    k = probe.num_predictors
    with torch.no_grad():
        rows = probe.attention_rows(*toks)
        plain = probe(*toks)
        same = probe(*toks, replace={k - 1: rows[:, k - 1]})
        torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
        other = rows.roll(1, dims=0)  # image i gets image i-1's rows
        full, ablated = probe.ablated_logits(*toks, control="replace", replacement=other)
        loop = torch.stack([probe(*toks, replace={j: other[:, j]}) for j in range(k)])
        torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ablated, loop, rtol=1e-5, atol=1e-5)
        assert (ablated - full).abs().amax() > 1e-6  # someone else's map changes the output
    assert probe.control_support("replace") is None


@pytest.mark.parametrize("name", ATTENTIVE)
def test_hook_sees_the_replaced_map_and_the_others_unchanged(name, toks):
    probe = make(name)
    with torch.no_grad():
        base = probe.attention(*toks)
        target = torch.softmax(torch.randn(6, N, generator=torch.Generator().manual_seed(1)), dim=-1)
        seen = hooked_output(probe, "hook_attn", *toks, replace={0: target})
    assert torch.allclose(seen[:, 0], target, atol=1e-6)  # dinovit: the mean over rows of the replaced rows
    assert torch.allclose(seen[:, 1:], base[:, 1:], atol=1e-6)  # (empty when K == 1)


@pytest.mark.parametrize("name", [n for n in ATTENTIVE if probes.probe_class(n).attn_hook_in_path])
def test_replacement_equals_the_same_edit_through_hook_attn(name, toks):
    """replace={j: m} edits the weights as writing m into row j of hook_attn's output does (non-patch mass kept)."""
    probe = make(name)
    j = probe.num_predictors - 1
    target = torch.softmax(3 * torch.randn(6, N, generator=torch.Generator().manual_seed(2)), dim=-1)

    def write(module, inputs, output):
        output = output.clone()
        output[:, j] = target
        return output

    with torch.no_grad():
        edited = hooked(probe, "hook_attn", write, *toks)
        replaced = probe(*toks, replace={j: target})
        plain = probe(*toks)
    torch.testing.assert_close(replaced, edited, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(replaced, plain, atol=1e-6)


@pytest.mark.parametrize("name", sorted({n for n in ATTENTIVE if family(n) in EXTRA_KEY_FAMILIES}))
def test_replacement_keeps_the_non_patch_mass(name, toks):
    """Replacing row j by its own map rescaled elsewhere changes nothing only if the non-patch mass is kept."""
    probe = make(name)
    with torch.no_grad():
        mass = probe.nonpatch_mass(*toks)
        rows = probe.attention_rows(*toks)
        assert ((mass > 0) & (mass < 1)).all()
        torch.testing.assert_close(probe(*toks, replace={0: rows[:, 0]}), probe(*toks), rtol=1e-5, atol=1e-5)


def test_dinovit_replaces_per_query_row_or_every_row_with_one_map(toks):
    probe = make("dinovit")
    with torch.no_grad():
        rows = probe.attention_rows(*toks)  # (B, H, N, N)
        one_map = rows[:, 0].mean(1)  # (B, N): the head's map, given to every query row
        per_row = probe(*toks, replace={0: rows[:, 0]})
        broadcast = probe(*toks, replace={0: one_map})
        torch.testing.assert_close(per_row, probe(*toks), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(broadcast, per_row, atol=1e-6)  # the rows differ from their mean


@pytest.mark.parametrize("name", ATTENTIVE)
def test_zero_is_manual_zeroing_through_hook_pooled_or_declined(name, toks):
    probe = make(name)
    k = probe.num_predictors
    if name not in SLICED:
        reason = probe.control_support("zero")
        assert reason is not None and "not sliced" in reason
        with pytest.raises(ValueError, match="not sliced"):
            probe.ablated_logits(*toks, control="zero")
        with pytest.raises(ValueError, match="not sliced"):
            probe(*toks, zero=[0])
        return
    slices = probe.predictor_slices()
    with torch.no_grad():
        full, ablated = probe.ablated_logits(*toks, control="zero")
        for j in sorted({0, k - 1}):

            def zero(module, inputs, output, cols=slices[j]):
                output = output.clone()
                output[:, cols] = 0
                return output

            manual = hooked(probe, "hook_pooled", zero, *toks)
            torch.testing.assert_close(probe(*toks, zero=[j]), manual, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ablated[j], manual, rtol=1e-5, atol=1e-5)
            seen = hooked_output(probe, "hook_pooled", *toks, zero=j)
            assert (seen[:, slices[j]] == 0).all()  # hook_pooled sees the zeroed feature
            assert not torch.equal(ablated[j], full)


def sharp_ep(name: str) -> Probe:
    probe = make(name)
    assert probe.fast_ablation
    return probe


@pytest.mark.parametrize("name", ["ep", "ep_all", "ep16_d4"])
@pytest.mark.parametrize("control", ["replace", "zero"])
def test_ep_batched_controls_equal_the_per_query_loop(name, control, toks):
    probe = sharp_ep(name)
    with torch.no_grad():
        rows = probe.attention_rows(*toks)
        replacement = None
        if control == "replace":
            mean = rows.mean(0, keepdim=True)  # (1, M, 1, N): one map per query for every image
            replacement = torch.where(torch.arange(6).view(6, 1, 1, 1) % 2 == 0, mean, rows.roll(2, dims=0))
        fast = probe.ablated_logits(*toks, control=control, replacement=replacement)
        loop = Probe.ablated_logits(probe, *toks, control=control, replacement=replacement)
    torch.testing.assert_close(fast[0], loop[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], loop[1], rtol=1e-5, atol=1e-5)
    assert (fast[1] - fast[0]).abs().amax() > 1e-3


def test_ep_batched_replacement_broadcasts_one_map_per_query(toks):
    probe = sharp_ep("ep")
    with torch.no_grad():
        mean = probe.attention(*toks).mean(0)  # (M, N)
        fast = probe.ablated_logits(*toks, control="replace", replacement=mean[None])  # (1, M, N)
        loop = torch.stack([probe(*toks, replace={j: mean[j]}) for j in range(probe.num_predictors)])
    torch.testing.assert_close(fast[1], loop, rtol=1e-5, atol=1e-5)


def test_ep_with_hooks_falls_back_to_the_loop(toks):
    probe = sharp_ep("ep")
    handle = probe.hook_pooled.register_forward_hook(lambda m, i, o: o * 2)
    try:
        assert not probe.fast_ablation
        with torch.no_grad():
            _, ablated = probe.ablated_logits(*toks, control="zero")
            ref = torch.stack([probe(*toks, zero=[j]) for j in range(probe.num_predictors)])
        torch.testing.assert_close(ablated, ref)
    finally:
        handle.remove()


def test_bad_controls(toks):
    probe = make("mhca")
    rows = probe.attention_rows(*toks)
    with pytest.raises(ValueError, match="control must be one of"):
        probe.ablated_logits(*toks, control="mean")
    with pytest.raises(ValueError, match="needs replacement="):
        probe.ablated_logits(*toks, control="replace")
    with pytest.raises(ValueError, match="takes no replacement"):
        probe.ablated_logits(*toks, control="uniform", replacement=rows)
    with pytest.raises(ValueError, match=r"replacement must be \(B or 1, K="):
        probe.ablated_logits(*toks, control="replace", replacement=torch.cat([rows, rows[:, :1]], dim=1))
    with pytest.raises(ValueError, match="both made uniform and replaced"):
        probe(*toks, uniform=[0], replace={0: rows[:, 0]})
    with pytest.raises(ValueError, match="replace got"):
        probe(*toks, replace={probe.num_predictors: rows[:, 0]})
    with pytest.raises(ValueError, match="its replacement has shape"):
        probe(*toks, replace={0: torch.full((6, N + 1), 1.0 / (N + 1))})
    with pytest.raises(ValueError, match=r"must be \(N,\), \(B, N\)"):
        probe(*toks, replace={0: torch.full((4, N), 1.0 / N)})
    gap = probes.build("gap", D, C)
    assert "no attention predictors" in gap.control_support("zero")
    with pytest.raises(ValueError, match="no attention predictors"):
        gap.attention_rows(*toks)


class _Ignores(OneMapProbe):
    """A family that never hands its weights to _route_attention."""

    def _pool(self, patch, prefix, uniform):
        maps = torch.full(patch.shape[:2], 1.0 / patch.shape[1]).unsqueeze(1)
        return Pooled(patch.mean(dim=1), maps)


def test_a_family_outside_the_routing_is_told_so(toks):
    probe = _Ignores(D, C).eval()
    with pytest.raises(RuntimeError, match="does not pass its `uniform` argument to _route_attention"):
        probe(*toks, replace={0: torch.full((N,), 1.0 / N)})
    with pytest.raises(RuntimeError, match="cannot be recorded"):
        probe.attention_rows(*toks)
