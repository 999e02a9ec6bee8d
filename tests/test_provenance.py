"""Provenance: the commit and versions, what a process used, figure sidecars, and the training logs."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from epviz import provenance
from epviz.probes import build
from epviz.tokens import TokenOrigin, TokenSet
from epviz.training import fit, probe_cache, train_probe
from epviz.viz import save_figure

ROOT = Path(__file__).resolve().parents[1]
FIT = {"epochs": 2, "warmup_epochs": 0}


@pytest.fixture(autouse=True)
def fresh_session(monkeypatch):
    monkeypatch.delenv("EPVIZ_COMMIT", raising=False)
    provenance.reset()
    yield
    provenance.reset()
    plt.close("all")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "probes"


def _tokens(n: int, seed: int, cache: str | None) -> TokenSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    patch = rng.standard_normal((n, 4, 8)).astype(np.float32) + labels[:, None, None]
    origin = TokenOrigin(backbone="toy", layer=1, cache=cache, dataset={"dataset": "toy-set", "split": "train"})
    return TokenSet(patch=patch, prefix=patch[:, :1].copy(), labels=labels, grid=(2, 2), origin=origin)


def _head() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# --- the code and the packages ---------------------------------------------------------------


def test_commit_is_the_checkouts_head_and_unknown_outside_a_checkout(tmp_path, monkeypatch):
    head = _head()
    assert provenance.git_commit() == (head or "unknown")
    if head:
        assert len(head) == 40
    assert provenance.git_commit(tmp_path) == "unknown" and provenance.git_dirty(tmp_path) is None
    monkeypatch.setenv("EPVIZ_COMMIT", "abc123")
    assert provenance.git_commit() == "abc123" and provenance.git_commit(tmp_path) == "abc123"


def test_package_versions_name_the_five_packages():
    versions = provenance.package_versions()
    assert list(versions) == ["epviz", "torch", "timm", "numpy", "pandas"]
    assert versions["numpy"] == np.__version__ and versions["pandas"] == pd.__version__


# --- what a process used ------------------------------------------------------------------------


def test_note_collects_caches_datasets_and_seeds_without_repeats():
    train, val = _tokens(6, 0, "cache-train"), _tokens(6, 1, "cache-val")
    provenance.note(dataset="toy-set", tokens={"toy": {"train": train, "val": val}}, seeds=[2, 0])
    provenance.note(dataset="toy-set", token_caches=["cache-train", "cache-test"], probe_caches=["ep-1"], seeds=[0])
    record = provenance.recorded()
    assert record == {
        "datasets": ["toy-set"],
        "token_caches": ["cache-train", "cache-val", "cache-test"],
        "probe_caches": ["ep-1"],
        "seeds": [0, 2],
    }
    provenance.reset()
    assert provenance.recorded() == {"datasets": [], "token_caches": [], "probe_caches": [], "seeds": []}


def test_the_probe_cache_hands_every_run_its_key_and_notes_it(cache_dir):
    train, val = _tokens(60, 0, "train-key"), _tokens(30, 1, "val-key")
    result = train_probe("ep", train, val, budget=FIT, seed=3, num_queries=2)
    key = result.config["probe_cache"]
    assert (cache_dir / f"{key}.safetensors").is_file()
    assert provenance.recorded()["probe_caches"] == [key] and provenance.recorded()["seeds"] == [3]
    provenance.reset()
    again = train_probe("ep", train, val, budget=FIT, seed=3, num_queries=2)
    assert again.config["cached"] == key and again.config["probe_cache"] == key, "loaded from the cache"
    assert provenance.recorded()["probe_caches"] == [key]
    assert provenance.recorded()["token_caches"] == ["train-key", "val-key"] and provenance.recorded()["datasets"] == ["toy-set"]
    other = train_probe("ep", train, val, budget=FIT, seed=4, num_queries=2)
    assert other.config["probe_cache"] != key, "another seed is another run"


# --- training logs ------------------------------------------------------------------------------


def test_every_probe_cache_entry_keeps_its_history_as_csv(cache_dir):
    train, val = _tokens(60, 0, "train-key"), _tokens(30, 1, "val-key")
    result = train_probe("gap", train, val, budget=FIT)
    key = result.config["probe_cache"]
    log = probe_cache.history_path(key)
    assert log == cache_dir / f"{key}.history.csv"
    history = pd.read_csv(log)
    assert list(history.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    assert history["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(history["val_acc"], result.history["val_acc"])
    assert not list(cache_dir.glob(".*.tmp")), "written atomically: no temporary file left"
    log.unlink()  # an entry stored before the history CSV existed gets it when it is loaded
    train_probe("gap", train, val, budget=FIT)
    np.testing.assert_allclose(pd.read_csv(log)["val_acc"], result.history["val_acc"])


def test_runs_without_a_cache_identity_write_no_log(cache_dir):
    result = train_probe("gap", _tokens(30, 0, None), _tokens(15, 1, "v"), budget=FIT)
    assert not cache_dir.exists() and "probe_cache" not in result.config
    assert provenance.recorded()["probe_caches"] == [] and provenance.recorded()["seeds"] == [0]


def test_tensorboard_without_the_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    probe = build("gap", 8, 3, seed=0)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        fit(probe, _tokens(30, 0, None), _tokens(15, 1, None), epochs=1, progress=False, tensorboard=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_tensorboard_logs_every_epoch(monkeypatch, tmp_path):
    logged = {}

    class Writer:
        def __init__(self, log_dir):
            logged["dir"], logged["scalars"], logged["flushes"], logged["closed"] = log_dir, [], 0, False

        def add_scalar(self, tag, value, step):
            logged["scalars"].append((tag, step, value))

        def flush(self):
            logged["flushes"] += 1

        def close(self):
            logged["closed"] = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    probe = build("gap", 8, 3, seed=0)
    result = fit(
        probe, _tokens(30, 0, None), _tokens(15, 1, None), epochs=2, warmup_epochs=0, progress=False, tensorboard=tmp_path
    )
    assert logged["dir"] == str(tmp_path) and logged["closed"] and logged["flushes"] == 2
    tags = {(tag, step) for tag, step, _ in logged["scalars"]}
    assert tags == {(t, s) for t in ("train/loss", "train/acc", "val/loss", "val/acc", "lr") for s in (1, 2)}
    val_acc = {step: value for tag, step, value in logged["scalars"] if tag == "val/acc"}
    assert [val_acc[1], val_acc[2]] == pytest.approx(result.history["val_acc"].tolist())


def test_tensorboard_is_off_by_default_and_never_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    fit(build("gap", 8, 3, seed=0), _tokens(30, 0, None), _tokens(15, 1, None), epochs=1, warmup_epochs=0, progress=False)


def test_tensorboard_is_no_part_of_the_cache_key_and_refused_with_a_grid(cache_dir, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    train, val = _tokens(60, 0, "train-key"), _tokens(30, 1, "val-key")
    first = train_probe("gap", train, val, budget=FIT)
    again = train_probe("gap", train, val, budget={**FIT, "tensorboard": tmp_path / "tb"})  # a hit: nothing to log
    assert "cached" in again.config and again.best_acc == first.best_acc
    with pytest.raises(ValueError, match="tensorboard= logs a single fit"):
        train_probe("gap", train, val, budget={**FIT, "tensorboard": tmp_path / "tb", "grid": {"lrs": (1e-3, 1e-2)}})


# --- sidecars ---------------------------------------------------------------------------------------


def _figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    return fig


def test_save_figure_writes_a_sidecar_with_commit_versions_and_files(tmp_path):
    data = pd.DataFrame({"backbone": ["a", "b"], "seed": [1, 0], "dataset": "toy-set", "value": [0.1, 0.2]})
    provenance.note(token_caches=["cache-a"], probe_caches=["ep-1"], seeds=[7])
    written = save_figure(_figure(), data, "fig", tmp_path, provenance={"images": [4, 2], "setting": "fast"})
    assert written == {"png": tmp_path / "fig.png", "csv": tmp_path / "fig.csv", "json": tmp_path / "fig.json"}
    doc = json.loads((tmp_path / "fig.json").read_text())
    assert doc == provenance.read_sidecar(tmp_path / "fig.png")
    assert (
        doc["figure"] == "fig" and doc["commit"] == provenance.git_commit() and doc["versions"] == provenance.package_versions()
    )
    assert doc["images"] == [4, 2] and doc["setting"] == "fast"
    import torch

    assert doc["compute"] == {"device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()} or (
        torch.cuda.is_available() and doc["compute"]["device"].startswith("cuda")
    )
    assert doc["seeds"] == [0, 1] and doc["dataset"] == "toy-set", "read off the table's seed and dataset columns"
    assert doc["token_caches"] == ["cache-a"] and doc["probe_caches"] == ["ep-1"], "what the process noted"
    assert doc["sources"] == {
        "seeds": "data",
        "dataset": "data",
        "token_caches": "session",
        "probe_caches": "session",
        "images": "given",
    }
    import hashlib

    for kind in ("png", "csv"):
        assert doc["files"][kind]["name"] == f"fig.{kind}"
        assert doc["files"][kind]["sha256"] == hashlib.sha256((tmp_path / f"fig.{kind}").read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.csv", "fig.json", "fig.png"]


def test_a_sidecar_without_anything_known_says_so(tmp_path):
    save_figure(_figure(), None, "bare", tmp_path)
    doc = provenance.read_sidecar(tmp_path / "bare.png")
    assert {field: doc[field] for field in provenance.SIDECAR_FIELDS} == dict.fromkeys(provenance.SIDECAR_FIELDS)
    assert doc["sources"] == dict.fromkeys(provenance.SIDECAR_FIELDS) and "csv" not in doc["files"]


def test_the_callers_values_win_and_numpy_values_are_plain_json(tmp_path):
    data = pd.DataFrame({"seed": [3]})
    provenance.note(seeds=[9], probe_caches=["ep-session"])
    given = {"seeds": np.array([5]), "probe_caches": ["ep-given"], "extra": {"ratio": np.float32(0.5), "bad": float("nan")}}
    save_figure(_figure(), data, "given", tmp_path, provenance=given)
    doc = provenance.read_sidecar(tmp_path / "given.json")
    assert doc["seeds"] == [5] and doc["probe_caches"] == ["ep-given"] and doc["extra"] == {"ratio": 0.5, "bad": None}
    assert doc["sources"]["seeds"] == "given"


def test_a_failed_sidecar_write_leaves_no_partial_file(tmp_path, monkeypatch):
    save_figure(_figure(), None, "keep", tmp_path)
    before = (tmp_path / "keep.json").read_text()
    real = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_figure(_figure(), None, "keep", tmp_path)
    assert (tmp_path / "keep.json").read_text() == before, "the old sidecar is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "keep.png"], "no temporary file left"


def test_reading_a_missing_sidecar_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="save it again"):
        provenance.read_sidecar(tmp_path / "old.png")


def test_token_cache_names_walk_nested_tokens_and_caches(tmp_path):
    class Cache:
        def __init__(self, name):
            self.path, self.meta = tmp_path / name, {}

    tokens = {"a": {"train": _tokens(3, 0, "ta"), "mem": _tokens(3, 0, None)}, "b": [Cache("cb"), "named"]}
    assert provenance.token_cache_names(tokens) == ["ta", "cb", "named"]
