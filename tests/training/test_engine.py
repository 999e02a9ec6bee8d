"""The training engine: K stacked heads equal K separate trainings (every family, every stacking mode),
a diverging head is masked, grids too large for memory are chunked, runs resume from a checkpoint."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import epviz.probes as probes
from epviz.errors import ConfigError, WeightsError
from epviz.tokens import TokenSet
from epviz.training import engine, fit, fit_grid, grid, lr_at
from epviz.training.engine import Recipe
from epviz.training.fit import TokenBatches
from epviz.training.stack import HeadStack

D, C, GRID = 64, 5, (4, 4)
N = GRID[0] * GRID[1]
EPOCHS, BATCH, WARMUP = 2, 16, 1
CPU = torch.device("cpu")


def token_set(n: int, seed: int) -> TokenSet:
    """Tokens whose class shows as a shifted direction on one random patch token."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    patch = rng.normal(size=(n, N, D)).astype(np.float16)
    patch[np.arange(n), rng.integers(0, N, n), labels] += 4.0
    prefix = rng.normal(size=(n, 1, D)).astype(np.float16)
    return TokenSet(patch, prefix, labels, GRID, num_classes=C)


@pytest.fixture(scope="module")
def train():
    return token_set(48, seed=0)


@pytest.fixture(scope="module")
def val():
    return token_set(32, seed=1)


def make(name: str, seed: int) -> probes.Probe:
    options = {"num_queries": 8} if name in ("ep", "ep_all") else {}
    return probes.build(name, D, C, grid=GRID, seed=seed, **options)


def reference(name: str, seed: int, lr: float, wd: float, tokens: TokenSet, optimizer: str) -> probes.Probe:
    """One head trained by a plain loop with torch's own optimiser: the oracle the stack must match."""
    probe = make(name, seed).train()
    params = [p for p in probe.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr) if optimizer == "adamw" else torch.optim.SGD(groups, lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    steps = len(tokens) // BATCH
    for epoch in range(EPOCHS):
        for step, batch in enumerate(tokens.batches(BATCH, shuffle=True, generator=generator, drop_last=True)):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch + step / steps, lr, EPOCHS, WARMUP)
            opt.zero_grad()
            F.cross_entropy(probe(batch.patch, batch.prefix), batch.labels).backward()
            opt.step()
    return probe.eval()


def stacked(name: str, configs, tokens: TokenSet, optimizer: str, mode: str, val: TokenSet | None = None):
    stack = HeadStack([make(name, seed) for seed, _, _ in configs], CPU, mode)
    return engine.train(
        stack,
        TokenBatches(tokens, val, BATCH, 0, CPU),
        Recipe(EPOCHS, optimizer, WARMUP),
        [lr for _, lr, _ in configs],
        [wd for _, _, wd in configs],
        device=CPU,
        desc="test",
        progress=False,
    )


def assert_same_head(a: probes.Probe, b: probes.Probe, tokens: TokenSet, atol: float = 2e-4) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key].float(), sb[key].float(), atol=atol, rtol=1e-4, msg=key)
    batch = tokens.batch(np.arange(16))
    with torch.no_grad():
        torch.testing.assert_close(a(batch.patch, batch.prefix), b(batch.patch, batch.prefix), atol=atol, rtol=1e-4)


CONFIGS = [(0, 3e-3, 0.05), (1, 1e-2, 0.0), (2, 3e-2, 0.1)]  # (initial seed, lr, weight decay) of three heads
HAND = [n for n in probes.available() if make(n, 0).has_stacked_form()]


SGD_CONFIGS = [(0, 0.05, 1e-4), (1, 0.1, 0.0)]


# Adam divides each gradient by its running magnitude, so a parameter whose gradient is 0 in exact arithmetic
# (a bias before a softmax) steps by +-lr on rounding noise; vmap's batched kernels round differently from
# one head's, so vmap is checked with SGD, which keeps noise at its size.
@pytest.mark.parametrize("mode, optimizer", [("loop", "adamw"), ("vmap", "sgd")])
@pytest.mark.parametrize("name", probes.available())
def test_stacked_heads_equal_separate_trainings_for_every_family(name, mode, optimizer, train):
    configs = CONFIGS if optimizer == "adamw" else SGD_CONFIGS
    trained = stacked(name, configs, train, optimizer, mode)
    assert trained.epochs_run == [EPOCHS] * len(configs) and trained.diverged == [None] * len(configs)
    for head, (seed, lr, wd) in zip(trained.heads, configs):
        assert_same_head(head, reference(name, seed, lr, wd, train, optimizer), train)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("name", HAND)
def test_the_hand_stacked_form_equals_separate_trainings(name, optimizer, train):
    assert HeadStack([make(name, 0)], CPU).mode == "hand"  # what "auto" picks for EP
    configs = CONFIGS if optimizer == "adamw" else SGD_CONFIGS
    trained = stacked(name, configs, train, optimizer, "hand")
    for head, (seed, lr, wd) in zip(trained.heads, configs):
        assert_same_head(head, reference(name, seed, lr, wd, train, optimizer), train)


def test_a_diverging_head_is_masked_and_the_others_go_on(train, val):
    configs = [(0, 1e-2, 0.0), (0, 1e6, 0.0), (1, 3e-2, 0.0)]
    trained = stacked("ep", configs, train, "sgd", "hand", val)
    assert trained.diverged[0] is None and trained.diverged[2] is None
    assert "training loss became" in trained.diverged[1] and math.isnan(trained.best_acc[1])
    assert trained.epochs_run == [EPOCHS, 1, EPOCHS]
    alone = stacked("ep", [configs[0], configs[2]], train, "sgd", "hand", val)
    for a, b in zip([trained.heads[0], trained.heads[2]], alone.heads):
        assert_same_head(a, b, train, atol=1e-6)


def test_a_grid_too_large_for_memory_trains_in_chunks_with_the_same_heads(train, val, monkeypatch, capsys):
    options = dict(lrs=(3e-3, 1e-2, 3e-2), weight_decays=(0.0, 0.1), epochs=EPOCHS, batch_size=BATCH, warmup_epochs=WARMUP)
    whole = fit_grid("ep", train, val, keep_all=True, progress=False, num_queries=8, **options)
    need = grid.head_bytes(whole.probe, train, BATCH, CPU, "fp32")
    assert need > 0
    monkeypatch.setattr(grid, "free_memory", lambda device: 2 * 2 * need)  # half of it holds two heads
    chunked = fit_grid("ep", train, val, keep_all=True, progress=False, num_queries=8, **options)
    assert "training 3 stacks of at most 2 heads" in capsys.readouterr().err
    assert chunked.config["heads_per_stack"] == 2 and whole.config["heads_per_stack"] == 6
    assert whole.points.equals(chunked.points)
    for a, b in zip(whole.probes, chunked.probes):
        assert_same_head(a, b, train, atol=1e-6)
    monkeypatch.setattr(grid, "free_memory", lambda device: need)  # half of it holds no head
    with pytest.raises(ConfigError, match="lower batch_size"):
        fit_grid("ep", train, val, progress=False, num_queries=8, **options)


def test_an_interrupted_fit_resumes_from_its_checkpoint(train, val, tmp_path, monkeypatch):
    options = dict(epochs=4, batch_size=BATCH, optimizer="adamw", lr=1e-2, warmup_epochs=1, progress=False)
    whole = fit(make("ep", 0), train, val, **options)
    path = tmp_path / "run.pt"
    validate, calls = engine._validate, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return validate(*args)

    monkeypatch.setattr(engine, "_validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(make("ep", 0), train, val, checkpoint=path, **options)
    monkeypatch.setattr(engine, "_validate", validate)
    assert path.exists()
    resumed = fit(make("ep", 0), train, val, checkpoint=path, **options)
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    assert resumed.history[cols].equals(whole.history[cols]) and resumed.best_epoch == whole.best_epoch
    assert_same_head(resumed.probe, whole.probe, train, atol=0)
    with pytest.raises(ConfigError, match="written by another run"):
        fit(make("ep", 0), train, val, checkpoint=path, **{**options, "lr": 3e-2})
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="delete it to start afresh"):
        fit(make("ep", 0), train, val, checkpoint=path, **options)


def test_seeds_are_a_grid_axis_and_selection_averages_over_them(train, val):
    result = fit_grid(
        "ep", train, val, lrs=(1e-2, 3e-2), weight_decays=(0.0,), seeds=(0, 1), keep_all=True, epochs=EPOCHS,
        batch_size=BATCH, warmup_epochs=WARMUP, progress=False, num_queries=8,
    )  # fmt: skip
    points = result.points
    assert points[["lr", "seed"]].values.tolist() == [[1e-2, 0], [1e-2, 1], [3e-2, 0], [3e-2, 1]]
    means = points.groupby("lr")["best_val_acc"].mean()
    assert result.best["lr"] == means.idxmax() and result.best["seed"] == 0
    alone = fit_grid("ep", train, val, lrs=(3e-2,), weight_decays=(0.0,), seed=0, keep_all=True, epochs=EPOCHS,
                     batch_size=BATCH, warmup_epochs=WARMUP, progress=False, num_queries=8)  # fmt: skip
    assert_same_head(result.probes[2], alone.probe, train, atol=1e-6)
    with pytest.raises(ConfigError, match="given by name"):
        fit_grid(make("ep", 0), train, val, lrs=(1e-2,), seeds=(0, 1), progress=False)
    with pytest.raises(ConfigError, match="repeated"):
        fit_grid("ep", train, val, lrs=(1e-2,), seeds=(1, 1), progress=False, num_queries=8)


def test_one_stack_holds_one_family_with_one_set_of_options():
    with pytest.raises(ConfigError, match="one probe family"):
        HeadStack([make("ep", 0), make("mhca", 0)], CPU)
    with pytest.raises(ConfigError, match="one probe family"):
        HeadStack([make("ep", 0), probes.build("ep", D, C, grid=GRID, num_queries=4)], CPU)
    with pytest.raises(ConfigError, match="at least one head"):
        HeadStack([], CPU)
    with pytest.raises(ConfigError, match="no hand-stacked form"):
        HeadStack([make("mhca", 0)], CPU, "hand")


def test_successive_halving_keeps_the_best_third_at_each_rung(train, val):
    assert (
        engine.halving_rungs(15, 3, 9) == [2, 5]
        and engine.halving_rungs(6, 3, 9) == [1, 2]
        and engine.halving_rungs(6, 3, 2) == []
    )
    assert engine.halving_rungs(6, None, 9) == [] and engine.halving_rungs(16, 2, 8) == [2, 4, 8]
    options = dict(lrs=(1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 0.1), weight_decays=(0.0,), epochs=6, batch_size=BATCH,
                   warmup_epochs=1, keep_all=True, progress=False, num_queries=8)  # fmt: skip
    full = fit_grid("ep", train, val, **options)
    halved = fit_grid("ep", train, val, halving=3, **options)
    points = halved.points
    assert sorted(points["epochs_run"]) == [1] * 6 + [2] * 2 + [6]
    assert sorted(points["halved"]) == [0] + [1] * 6 + [2] * 2
    after_one = full.history[full.history["epoch"] == 1].sort_values(["val_acc", "point"], ascending=[False, True])
    assert set(points.loc[points["epochs_run"] > 1, "point"]) == set(after_one["point"].head(3))  # the best third went on
    survivor = int(points.loc[points["epochs_run"] == 6, "point"].iloc[0])
    assert int(halved.best["point"]) == survivor
    assert_same_head(halved.probes[survivor], full.probes[survivor], train, atol=1e-6)  # halving changes no head's training
    with pytest.raises(ValueError, match="halving"):
        fit_grid("ep", train, val, halving=1, **options)
