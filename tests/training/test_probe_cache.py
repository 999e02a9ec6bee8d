"""The on-disk cache of trained probes: hits, misses on every key component, and no identity."""

import numpy as np
import pytest
import torch

from epviz.tokens import TokenOrigin, TokenSet
from epviz.training import probe_cache, train_probe
from epviz.training.runs import layer_sweep, low_shot

FIT = {"epochs": 2, "warmup_epochs": 0}


def _tokens(n: int, seed: int, cache: str | None) -> TokenSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    patch = rng.standard_normal((n, 4, 8)).astype(np.float32) + labels[:, None, None]
    origin = TokenOrigin(backbone="toy", layer=1, cache=cache)
    return TokenSet(patch=patch, prefix=patch[:, :1].copy(), labels=labels, grid=(2, 2), origin=origin)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path))
    return tmp_path / "probes"


def test_second_run_loads_the_stored_probe(cache_dir, monkeypatch):
    train, val = _tokens(60, 0, "train-key"), _tokens(30, 1, "val-key")
    first = train_probe("ep", train, val, budget=FIT, num_queries=2)
    assert len(list(cache_dir.glob("ep-*.safetensors"))) == 1
    monkeypatch.setattr(probe_cache, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    second = train_probe("ep", train, val, budget=FIT, num_queries=2)
    assert second.config["cached"].startswith("ep-")
    assert second.best_epoch == first.best_epoch and second.best_acc == pytest.approx(first.best_acc)
    assert second.history["val_acc"].tolist() == pytest.approx(first.history["val_acc"].tolist())
    for (name, a), (_, b) in zip(first.probe.state_dict().items(), second.probe.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), name
    batch = train.batch(np.arange(5))
    torch.testing.assert_close(first.probe.eval()(batch.patch, batch.prefix), second.probe(batch.patch, batch.prefix))


@pytest.mark.parametrize("change", ["seed", "options", "fit", "train", "val", "layer", "probe"])
def test_every_key_component_changes_the_key(change):
    train, val = _tokens(12, 0, "t"), _tokens(6, 1, "v")
    base = dict(name="ep", options={"num_queries": 2}, num_classes=3, train=train, val=val, fit_options=FIT, seed=0)
    other = dict(base)
    if change == "seed":
        other["seed"] = 1
    elif change == "options":
        other["options"] = {"num_queries": 4}
    elif change == "fit":
        other["fit_options"] = {**FIT, "epochs": 3}
    elif change == "train":
        other["train"] = _tokens(12, 0, "t2")
    elif change == "val":
        other["val"] = _tokens(6, 1, "v2")
    elif change == "layer":
        other["train"] = TokenSet(
            patch=train.patch, prefix=train.prefix, labels=train.labels, grid=(2, 2), origin=train.origin.replace(layer=0)
        )
    else:
        other["name"] = "mhca"
    assert probe_cache.probe_key(**base) == probe_cache.probe_key(**dict(base))
    assert probe_cache.probe_key(**base) != probe_cache.probe_key(**other)


def test_tokens_without_a_cache_identity_are_never_stored(cache_dir):
    train, val = _tokens(30, 0, None), _tokens(15, 1, "v")
    assert probe_cache.probe_key("ep", {}, 3, train, val, FIT, 0) is None
    train_probe("gap", train, val, budget=FIT)
    subset = _tokens(30, 0, "t").subset(np.arange(10))
    assert probe_cache.probe_key("gap", {}, 3, subset, val, FIT, 0) is None
    train_probe("gap", subset, val, budget=FIT)
    train_probe("gap", _tokens(30, 0, "t"), val, budget=FIT, cache=False)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_an_unreadable_entry_is_trained_again_and_replaced(cache_dir):
    train, val = _tokens(30, 0, "t"), _tokens(15, 1, "v")
    train_probe("gap", train, val, budget=FIT)
    (meta,) = cache_dir.glob("gap-*.json")
    meta.write_text("{ not json")
    again = train_probe("gap", train, val, budget=FIT)
    assert "cached" not in again.config
    assert probe_cache.load_cached_fit(meta.name[: -len(".json")]) is not None


@pytest.mark.parametrize("damage", ["[" * 100_000 + "]" * 100_000, '{"best_epoch": "x"}', '{"fit": [1]}'])
def test_a_nested_or_garbled_entry_is_trained_again_never_a_raw_error(cache_dir, damage):
    train, val = _tokens(30, 0, "t"), _tokens(15, 1, "v")
    train_probe("gap", train, val, budget=FIT)
    (meta,) = cache_dir.glob("gap-*.json")
    meta.write_text(damage)
    assert probe_cache.load_cached_fit(meta.name[: -len(".json")]) is None
    assert "cached" not in train_probe("gap", train, val, budget=FIT).config


def test_layer_sweep_reuses_runs_and_low_shot_does_not_store(cache_dir):
    caches = ({1: _tokens(30, 0, "t")}, {1: _tokens(15, 1, "v")})
    first = layer_sweep(*caches, probes=("gap",), epochs=2, warmup_epochs=0, progress=False, optimizer="adamw")
    stored = sorted(cache_dir.glob("*.json"))
    assert len(stored) == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe_cache, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
        again = layer_sweep(*caches, probes=("gap",), epochs=2, warmup_epochs=0, progress=False, optimizer="adamw")
    assert again["best_acc"].tolist() == pytest.approx(first["best_acc"].tolist())
    low_shot(
        caches[0][1],
        caches[1][1],
        shots=(2,),
        seeds=(0,),
        probes=("gap",),
        epochs=2,
        warmup_epochs=0,
        progress=False,
        optimizer="adamw",
    )
    assert sorted(cache_dir.glob("*.json")) == stored


def test_options_left_at_their_default_give_the_same_key(cache_dir, monkeypatch):
    train, val = _tokens(30, 0, "t"), _tokens(15, 1, "v")
    first = train_probe("ep", train, val, budget=FIT, num_queries=2)
    monkeypatch.setattr(probe_cache, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    same = train_probe("ep", train, val, budget=FIT, num_queries=2, d_out=1)
    assert same.config["cached"] and same.best_acc == pytest.approx(first.best_acc)


def test_grid_points_reads_every_point_of_the_tuned_runs(cache_dir):
    import pandas as pd

    train, val = _tokens(60, 0, "train-key"), _tokens(30, 1, "val-key")
    tuned = train_probe("ep", train, val, budget={**FIT, "grid": {"lrs": (1e-3, 1e-2, 1e-1)}}, num_queries=2)
    single = train_probe("gap", train, val, budget=FIT)
    keys = sorted(p.name[: -len(".json")] for p in cache_dir.glob("*.json"))
    entries = [next(k for k in keys if k.startswith("ep-")), next(k for k in keys if k.startswith("gap-")), None]
    runs = pd.DataFrame({"backbone": ["toy"] * 3, "probe": ["ep2", "gap", "lp"], "seed": [0, 0, 0], "probe_cache": entries})
    points = probe_cache.grid_points(runs)
    assert points["probe"].tolist() == ["ep2"] * 3, "a single fit and a row without an entry give no points"
    assert sorted(points["lr"]) == [1e-3, 1e-2, 1e-1]
    assert points["chosen"].sum() == 1
    assert points.loc[points["chosen"], "lr"].item() == tuned.config["lr"]
    assert points.loc[points["chosen"], "best_val_acc"].item() == pytest.approx(points["best_val_acc"].max())
    assert points.set_index("lr")["edge"].to_dict() == {1e-3: True, 1e-2: False, 1e-1: True}
    assert single.config.get("grid") is None
    with pytest.raises(ValueError, match="probe_cache column"):
        probe_cache.grid_points(runs.drop(columns="probe_cache"))
