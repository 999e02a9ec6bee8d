"""fit(): schedule, LARS, best-epoch selection, determinism, save/load, input errors."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import epviz.probes as probes
from epviz.errors import ConfigError, DataError, WeightsError
from epviz.evaluate import accuracy, predict
from epviz.tokens import TokenSet
from epviz.training import LARS, FitResult, engine, fit, fit_grid, load_probe, lr_at, save_probe
from epviz.training.fit import DIVERGENCE_FACTOR, divergence
from epviz.training.optim import check_fit_options, make_optimizer

D, C = 16, 3


def token_set(n=96, seed=0, num_tokens=4, prefix=True) -> TokenSet:
    """Tokens whose class shows as a shifted direction on one random patch token."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    patch = rng.normal(size=(n, num_tokens, D)).astype(np.float16)
    patch[np.arange(n), rng.integers(0, num_tokens, n), labels] += 4.0
    pre = rng.normal(size=(n, 1, D)).astype(np.float16) if prefix else None
    side = int(num_tokens**0.5)
    return TokenSet(patch, pre, labels, (side, side), num_classes=C)


@pytest.fixture(scope="module")
def data():
    return token_set(96, seed=0), token_set(48, seed=1)


def run(data, seed=0, name="ep", **kwargs):
    options = dict(epochs=4, batch_size=16, optimizer="adamw", lr=1e-2, warmup_epochs=1, progress=False, seed=seed)
    options.update(kwargs)
    probe = probes.build(name, D, C, seed=seed, **({"num_queries": 4} if name == "ep" else {}))
    return fit(probe, data[0], data[1], **options)


def test_fit_returns_history_and_restores_the_best_epoch(data):
    result = run(data, epochs=6)
    assert isinstance(result, FitResult)
    h = result.history
    assert list(h.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    assert h["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    assert result.best_acc == h["val_acc"].max()
    assert result.best_epoch == int(h.loc[h["val_acc"].idxmax(), "epoch"])
    assert result.final_acc == h["val_acc"].iloc[-1]
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert result.best_acc > 0.6  # the data is separable
    assert not result.probe.training
    assert accuracy(result.probe, data[1])["top1"] == pytest.approx(result.best_acc)
    assert result.config["protocol"].startswith("cached tokens") and result.config["probe"]["name"] == "ep"


def test_best_state_is_the_selected_epoch(data, monkeypatch):
    """Validation accuracy is scripted: best at epoch 2, then flat; patience 2 stops at epoch 4."""
    scripted = iter([0.5, 0.7, 0.6, 0.7, 0.9, 0.9])
    snapshots = []

    def fake_eval(stack, *args):
        snapshots.append({k: v[0].clone() for k, v in stack.state().items()})
        return [1.0], [next(scripted)]

    monkeypatch.setattr(engine, "_validate", fake_eval)
    result = run(data, epochs=6, early_stopping=2)
    assert len(result.history) == 4 and result.config["epochs_run"] == 4
    assert result.best_epoch == 2 and result.best_acc == 0.7 and result.final_acc == 0.7
    final = result.probe.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)


def test_runs_are_deterministic_for_a_seed(data):
    a, b = run(data, seed=5, optimizer="lars"), run(data, seed=5, optimizer="lars")
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    assert a.history[cols].equals(b.history[cols])
    sa, sb = a.probe.state_dict(), b.probe.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = run(data, seed=6, optimizer="lars")
    assert not a.history["train_loss"].equals(c.history["train_loss"])


def test_schedule_warmup_then_cosine():
    assert lr_at(0.0, 1.0, 10, 2) == 0.0
    assert lr_at(1.0, 1.0, 10, 2) == pytest.approx(0.5)
    assert lr_at(2.0, 1.0, 10, 2) == pytest.approx(1.0)
    assert lr_at(6.0, 1.0, 10, 2) == pytest.approx(0.5)
    assert lr_at(10.0, 1.0, 10, 2) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(e / 10, 1.0, 10, 2) for e in range(101)]
    assert values.index(max(values)) == 20 and all(b <= a + 1e-12 for a, b in zip(values[20:], values[21:]))


def test_history_lr_follows_the_schedule(data):
    result = run(data, epochs=3, warmup_epochs=1, lr=0.5)
    steps = 96 // 16
    expected = [lr_at(e + (steps - 1) / steps, 0.5, 3, 1) for e in range(3)]
    assert result.history["lr"].tolist() == pytest.approx(expected)


def test_default_learning_rates(data):
    assert run(data, epochs=1, optimizer="lars", lr=None, batch_size=32).config["lr"] == pytest.approx(0.1 * 32 / 256)
    assert run(data, epochs=1, optimizer="adamw", lr=None).config["lr"] == pytest.approx(1e-3)


def test_lars_step():
    # one head (a leading axis of 1): a 2-D weight and a 1-D bias
    w = torch.tensor([[[3.0, 4.0]]], requires_grad=True)  # ||w|| = 5
    b = torch.tensor([[1.0, 1.0]], requires_grad=True)
    opt = LARS({"w": w, "b": b}, lr=torch.tensor([0.1]), weight_decay=torch.tensor([0.0]))
    w.grad = torch.tensor([[[0.0, 2.0]]])  # ||g|| = 2
    b.grad = torch.tensor([[0.5, -0.5]])
    opt.step(1.0)
    # 2-D: update = g * 0.001 * ||w|| / ||g||; 1-D: plain momentum SGD
    assert torch.allclose(w.detach(), torch.tensor([[[3.0, 4.0 - 0.1 * 2.0 * 0.001 * 5 / 2]]]))
    assert torch.allclose(b.detach(), torch.tensor([[0.95, 1.05]]))
    opt.step(1.0)  # momentum accumulates
    assert torch.allclose(b.detach(), torch.tensor([[0.95 - 0.1 * 0.95, 1.05 + 0.1 * 0.95]]))


def test_save_and_load_round_trip(data, tmp_path):
    result = run(data, epochs=2, name="mhca")
    base = result.save(tmp_path / "runs" / "probe")
    assert (tmp_path / "runs" / "probe.safetensors").exists() and (tmp_path / "runs" / "probe.json").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["probe.json", "probe.safetensors"]
    doc = json.loads((tmp_path / "runs" / "probe.json").read_text())
    assert doc["probe"] == result.probe.config and len(doc["history"]) == 2
    assert doc["best_epoch"] == result.best_epoch and doc["fit"]["optimizer"] == "adamw"
    for path in (base, str(base) + ".json", tmp_path / "runs" / "probe.safetensors"):
        loaded = load_probe(path)
        assert not loaded.training
        a, b = predict(result.probe, data[1]).logits, predict(loaded, data[1]).logits
        assert np.array_equal(a, b)


def test_save_probe_with_grid_and_nan_history(data, tmp_path):
    probe = probes.build("clip", D, C, grid=(2, 2), heads=2)
    result = fit(probe, data[0], None, epochs=1, warmup_epochs=0, batch_size=32, progress=False)
    assert math.isnan(result.best_acc) and math.isnan(result.final_acc) and result.best_epoch == 1
    result.save(tmp_path / "clip.json")
    doc = json.loads((tmp_path / "clip.json").read_text())
    assert doc["best_acc"] is None and doc["history"][0]["val_acc"] is None
    loaded = load_probe(tmp_path / "clip")
    assert loaded.grid == (2, 2) and loaded.num_tokens == 4
    save_probe(loaded, tmp_path / "copy")
    assert load_probe(tmp_path / "copy").config == loaded.config


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved probe"):
        load_probe(tmp_path / "nothing")


def test_bf16_precision_trains(data):
    result = run(data, epochs=2, precision="bf16")
    assert np.isfinite(result.history["train_loss"]).all()


@pytest.mark.parametrize("name", ["gap", "cls", "ep_all", "cbam", "dolg"])
def test_other_probes_fit(data, name):
    probe = probes.build(name, D, C, seed=0, **({"num_queries": 4} if name == "ep_all" else {}))
    result = fit(probe, data[0], data[1], epochs=2, warmup_epochs=1, batch_size=16, optimizer="adamw", lr=1e-2, progress=False)
    assert len(result.history) == 2


class TestErrors:
    def test_nan_tokens(self, data):
        bad = token_set(32, seed=3)
        bad.patch[7, 1, 2] = np.nan
        with pytest.raises(ValueError, match=r"train tokens contain NaN or inf \(patch tokens of sample 7"):
            fit(probes.build("gap", D, C), bad, progress=False, epochs=1, warmup_epochs=0)
        bad = token_set(32, seed=3)
        bad.prefix[4, 0, 0] = np.inf
        with pytest.raises(ValueError, match="validation tokens contain NaN or inf .prefix tokens of sample 4"):
            fit(probes.build("gap", D, C), data[0], bad, progress=False, epochs=1, warmup_epochs=0)

    def test_labels_out_of_range(self, data):
        with pytest.raises(ValueError, match=r"labels range from 0 to 2 \(max label 2\) but probe 'gap' has num_classes=2"):
            fit(probes.build("gap", D, 2), data[0], progress=False)
        bad = token_set(32)
        bad.labels[3] = -1
        with pytest.raises(ValueError, match="labels range from -1"):
            fit(probes.build("gap", D, C), bad, progress=False)

    def test_empty_and_tiny_sets(self, data):
        empty = data[0].subset([])
        with pytest.raises(ValueError, match="the train token set is empty"):
            fit(probes.build("gap", D, C), empty, progress=False)
        with pytest.raises(ValueError, match="the validation token set is empty"):
            fit(probes.build("gap", D, C), data[0], empty, progress=False)
        with pytest.raises(ValueError, match="at least 2 training samples"):
            fit(probes.build("gap", D, C), data[0].subset([0]), progress=False)

    def test_width_mismatch(self, data):
        with pytest.raises(ValueError, match="expects tokens of width D=32 but the train tokens have D=16"):
            fit(probes.build("gap", 32, C), data[0], progress=False)

    def test_missing_prefix(self):
        with pytest.raises(ValueError, match=r"probe 'cls' reads prefix tokens \(\[CLS\]\) but the train tokens have none"):
            fit(probes.build("cls", D, C), token_set(32, prefix=False), progress=False)

    def test_bad_options(self, data):
        probe = probes.build("gap", D, C)
        with pytest.raises(ValueError, match="optimizer must be one of"):
            fit(probe, data[0], optimizer="rmsprop")
        with pytest.raises(ValueError, match="precision must be one of"):
            fit(probe, data[0], precision="fp16")
        with pytest.raises(ValueError, match="early_stopping needs validation tokens"):
            fit(probe, data[0], early_stopping=3)
        with pytest.raises(TypeError, match="fit expects a Probe"):
            fit(torch.nn.Linear(2, 2), data[0])

    def test_a_nan_loss_marks_the_run_diverged(self, data):
        with pytest.warns(RuntimeWarning, match=r"fit: probe 'mhca' diverged: the training loss became nan .* at epoch 1"):
            result = run(data, epochs=2, lr=1e30, optimizer="adamw", warmup_epochs=0, name="mhca")
        assert result.diverged and result.config["diverged"] and math.isnan(result.best_acc) and math.isnan(result.final_acc)
        assert len(result.history) == 1 and result.history[["train_loss", "val_acc"]].isna().all().all()


class TestRefusedInputs:
    """One clear epviz error per bad input, raised before any training step."""

    def test_nan_in_the_dropped_last_batch_is_found(self, data):
        bad = token_set(40, seed=3)  # batch 16 with drop_last: samples 32..39 are never in a batch
        bad.patch[37, 0, 0] = np.nan
        with pytest.raises(DataError, match=r"train tokens contain NaN or inf \(patch tokens of sample 37; 1 of 40 samples"):
            fit(probes.build("gap", D, C), bad, progress=False, epochs=2, warmup_epochs=0, batch_size=16)

    def test_nan_is_found_before_any_step(self, data, monkeypatch):
        bad = token_set(48, seed=4)
        bad.prefix[[5, 9, 30], 0, 1] = np.inf
        steps = []
        monkeypatch.setattr(engine, "make_optimizer", lambda *a, **k: steps.append(1))
        with pytest.raises(DataError, match=r"validation tokens contain NaN or inf \(prefix tokens of sample 5; 3 of 48 samples"):
            fit(probes.build("gap", D, C), data[0], bad, progress=False, epochs=3, warmup_epochs=0)
        assert not steps, "nothing was set up for training"

    def test_memory_mapped_tokens_are_scanned_in_chunks(self, tmp_path, monkeypatch):
        ts = token_set(64, seed=5)
        patch = np.array(ts.patch)
        patch[50, 2, 3] = np.nan
        np.save(tmp_path / "patch.npy", patch)
        mapped = TokenSet(np.load(tmp_path / "patch.npy", mmap_mode="r"), ts.prefix, ts.labels, ts.grid, num_classes=C)
        reads = []
        real = np.asarray

        def spy(a, *args, **kwargs):
            out = real(a, *args, **kwargs)
            if isinstance(a, np.memmap):
                reads.append(len(out))
            return out

        monkeypatch.setattr(np, "asarray", spy)
        found = mapped.find_nonfinite(chunk_bytes=10 * 4 * D * 2)  # 10 samples of fp16 per chunk
        monkeypatch.undo()
        assert (found.first, found.part, found.count, found.total) == (50, "patch", 1, 64)
        assert reads and max(reads) == 10, "never more than one chunk in memory"
        with pytest.raises(DataError, match="sample 50"):
            fit(probes.build("gap", D, C), mapped, progress=False, epochs=1, warmup_epochs=0)

    def test_a_finite_loss_far_above_chance_is_divergence_as_in_fit_grid(self, data):
        # the loss left 100 ln C but stayed finite: fit returned this run without a word, fit_grid marked it diverged
        options = dict(epochs=3, batch_size=16, warmup_epochs=1, optimizer="adamw", seed=0, progress=False)
        with pytest.warns(RuntimeWarning, match=r"grid point 1 \(lr 1e\+06.*diverged: the training loss became"):
            grid = fit_grid("ep", *data, lrs=(1e-2, 1e6), num_queries=4, **options)
        with pytest.warns(RuntimeWarning) as caught:
            result = fit(probes.build("ep", D, C, seed=0, num_queries=4), *data, lr=1e6, **options)
        message = str(caught[0].message)
        assert "fit: probe 'ep' diverged: the training loss became" in message and "smaller learning rate than 1e+06" in message
        assert f"limit {DIVERGENCE_FACTOR * math.log(C):.4g}" in message
        assert result.diverged and math.isnan(result.best_acc) and math.isnan(result.final_acc)
        diverged_point = grid.history[grid.history["point"] == 1]
        assert len(result.history) == len(diverged_point) == grid.points.loc[1, "epochs_run"], "the same epoch, the same rule"
        assert np.isnan(result.history["train_loss"].iloc[-1]) and grid.points.loc[1, "diverged"]
        assert all(torch.isfinite(p).all() for p in result.probe.parameters()), "the diverging step was not taken"

    def test_a_healthy_run_is_not_diverged(self, data):
        result = run(data, epochs=2)
        assert not result.diverged and result.config["diverged"] is False

    @pytest.mark.parametrize(
        ("loss", "diverged"),
        [
            (0.5, False),
            (100 * math.log(3), False),
            (100 * math.log(3) + 1e-6, True),
            (2e8, True),
            (math.nan, True),
            (math.inf, True),
        ],
    )
    def test_the_divergence_rule(self, loss, diverged):
        assert (divergence(loss, 3) is not None) is diverged

    @pytest.mark.parametrize(
        "option, value, names",
        [
            ("lr", -0.5, "lr must be a finite number > 0"),
            ("lr", 0.0, "lr must be"),
            ("lr", float("nan"), "lr must be"),
            ("lr", float("inf"), "lr must be"),
            ("weight_decay", -1e-4, "weight_decay must be a finite number >= 0"),
            ("epochs", 0, "epochs must be an integer >= 1"),
            ("epochs", 2.5, "epochs must be an integer"),
            ("batch_size", 0, "batch_size must be an integer >= 1"),
            ("batch_size", True, "batch_size must be an integer"),
            ("warmup_epochs", -1, "warmup_epochs must be a finite number >= 0"),
            ("warmup_epochs", 5, r"warmup_epochs=5 is longer than the run \(epochs=4\)"),
            ("label_smoothing", 1.0, r"label_smoothing must be a finite number in \[0, 1\)"),
            ("early_stopping", 0, "early_stopping"),
            ("early_stopping", True, "early_stopping"),
            ("seed", True, "seed must be an integer >= 0, got True"),
            ("seed", -1, "seed must be an integer >= 0, got -1"),
            ("seed", 1.5, "seed must be an integer >= 0, got 1.5"),
            ("lr", True, "lr must be a finite number > 0"),
            ("weight_decay", True, "weight_decay must be a finite number >= 0"),
            ("epochs", True, "epochs must be an integer"),
            ("warmup_epochs", True, "warmup_epochs must be a finite number"),
            ("optimizer", "rmsprop", "optimizer must be one of"),
            ("precision", "fp16", "precision must be one of"),
        ],
    )
    def test_options_out_of_range(self, data, option, value, names):
        with pytest.raises(ConfigError, match=names):
            run(data, **{option: value, "optimizer": "lars"} if option != "optimizer" else {option: value})

    def test_the_optimisers_check_their_arguments(self):
        params = {"w": torch.zeros(2, 2, 2, requires_grad=True)}
        for name in ("lars", "adamw", "sgd"):
            for lrs, wds, names in [((-0.5, 0.1), (0.0, 0.0), "lr"), ((0.1, 0.1), (0.0, -1.0), "weight_decay")]:
                with pytest.raises(ConfigError, match=names):
                    make_optimizer(name, params, lrs, wds)
        with pytest.raises(ConfigError, match="optimizer must be one of"):
            make_optimizer("rmsprop", params, (0.1, 0.1), (0.0, 0.0))

    def test_check_fit_options_is_the_shared_gate(self):
        check_fit_options("lars", "fp32", 10, 8, 10, 0.0, None, None, lr=0.1, weight_decay=0.0)  # warm-up == epochs is allowed
        with pytest.raises(ConfigError, match="lr"):
            check_fit_options("lars", "fp32", 10, 8, 1, 0.0, None, None, lr=-0.5)

    def test_a_single_training_class_is_refused(self):
        one = token_set(32, seed=6)
        one.labels[:] = 2
        with pytest.raises(DataError, match=r"training set holds a single class \(label 2, all 32 samples\)"):
            fit(probes.build("gap", D, C), one, progress=False, epochs=1, warmup_epochs=0)

    def test_validation_classes_missing_from_training_warn(self, data):
        train = token_set(60, seed=7)
        keep = np.flatnonzero(train.labels != 2)
        train = train.subset(keep)
        with pytest.warns(UserWarning, match=r"validation set holds 1 classes the training set lacks \(2\)"):
            fit(probes.build("gap", D, C), train, data[1], progress=False, epochs=1, warmup_epochs=0)

    def test_label_errors_are_config_errors(self, data):
        with pytest.raises(ConfigError, match=r"\d+ of 96 samples lie outside: build the probe with num_classes=3"):
            fit(probes.build("gap", D, 2), data[0], progress=False)


class TestSavedProbeFiles:
    def test_weights_that_do_not_fit_their_json(self, data, tmp_path):
        save_probe(probes.build("gap", D, C), tmp_path / "a")
        save_probe(probes.build("gap", D, 5), tmp_path / "b")
        (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")  # weights of a 5-class probe beside a 3-class JSON
        with pytest.raises(WeightsError) as err:
            load_probe(tmp_path / "a")
        first = str(err.value).splitlines()[0]
        assert "a.safetensors does not fit the probe its JSON describes ('gap', dim=16, num_classes=3)" in first
        assert "head.weight (5, 16) vs (3, 16)" in str(err.value)

    def test_missing_and_extra_tensors(self, tmp_path):
        probe = probes.build("gap", D, C)
        save_probe(probe, tmp_path / "p")
        state = {k: v.contiguous() for k, v in probe.state_dict().items() if k != "head.bias"}
        state["extra.weight"] = torch.zeros(2)
        save_file(state, str(tmp_path / "p.safetensors"))
        with pytest.raises(WeightsError, match=r"(?s)missing keys: head.bias.*unexpected keys: extra.weight"):
            load_probe(tmp_path / "p")

    def test_nan_weights(self, tmp_path):
        probe = probes.build("gap", D, C)
        save_probe(probe, tmp_path / "p")
        state = {k: v.clone().contiguous() for k, v in probe.state_dict().items()}
        state["head.weight"][1, :3] = float("nan")
        save_file(state, str(tmp_path / "p.safetensors"))
        with pytest.raises(WeightsError, match=r"p.safetensors: tensor 'head.weight' holds 3 NaN or inf values \(of 48\)"):
            load_probe(tmp_path / "p")

    def test_bad_json(self, tmp_path):
        save_probe(probes.build("gap", D, C), tmp_path / "p")
        (tmp_path / "p.json").write_text("{not json")
        with pytest.raises(WeightsError, match="p.json is not readable JSON"):
            load_probe(tmp_path / "p")
        (tmp_path / "p.json").write_text(
            json.dumps({"format": "epviz-probe/1", "probe": {"name": "no-such-probe", "dim": D, "num_classes": C}})
        )
        with pytest.raises(WeightsError, match="describes a probe that cannot be built"):
            load_probe(tmp_path / "p")

    def test_save_probe_arguments(self, tmp_path):
        with pytest.raises(TypeError, match="save_probe expects a Probe"):
            save_probe(torch.nn.Linear(2, 2), tmp_path / "x")
        with pytest.raises(TypeError, match="extra must be a dict"):
            save_probe(probes.build("gap", D, C), tmp_path / "x", extra=[1])

    def test_unknown_device_is_a_config_error(self, tmp_path):
        save_probe(probes.build("gap", D, C), tmp_path / "p")
        with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
            load_probe(tmp_path / "p", device="gpu0")


def test_default_warmup_keeps_the_reference_ratio(data):
    from epviz.training.optim import default_warmup

    assert default_warmup(90) == 10 and default_warmup(200) == 10 and default_warmup(9) == 1
    result = run(data, epochs=3, warmup_epochs=None)
    assert result.config["warmup_epochs"] == pytest.approx(1 / 3)
    assert result.history["lr"].iloc[0] < 1e-2, "the first epoch ends after the warm-up, on the way down the cosine"


def test_fit_draws_one_stored_view_per_image_per_epoch(monkeypatch):
    from epviz.tokens import TokenSet
    from epviz.training import fit
    from epviz.training.fit import PROTOCOL

    rng = np.random.default_rng(0)
    n, views = 24, 3
    labels = np.arange(n) % 2
    patch = rng.normal(size=(n * views, 4, 8)).astype(np.float32)
    train = TokenSet(patch=patch, prefix=None, labels=labels, grid=(2, 2), views=views)
    plain = TokenSet(patch=patch[::views].copy(), prefix=None, labels=labels, grid=(2, 2))
    read: list[np.ndarray] = []
    real = TokenSet.for_epoch

    def spy(self, epoch, seed):
        chosen = real(self, epoch, seed)
        read.append(chosen.view_choice.copy())
        return chosen

    monkeypatch.setattr(TokenSet, "for_epoch", spy)
    result = fit(
        probes.build("gap", 8, 2, seed=0), train, plain, epochs=4, batch_size=8, lr=1e-2, warmup_epochs=0, progress=False
    )
    assert len(read) == 4 and all(len(r) == n for r in read)
    assert len({r.tobytes() for r in read}) == 4, "a new draw of views every epoch"
    np.testing.assert_array_equal(read[2], real(train, 2, 0).view_choice)  # the draw of (seed, epoch)
    assert set(np.concatenate(read)) == {0, 1, 2}
    assert result.config["protocol"].startswith("cached tokens of 3 stored augmented views")
    single = fit(
        probes.build("gap", 8, 2, seed=0), plain, plain, epochs=1, batch_size=8, lr=1e-2, warmup_epochs=0, progress=False
    )
    assert single.config["protocol"] == PROTOCOL
