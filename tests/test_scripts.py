"""The zoo scripts run end to end (a few steps) and write complete, verifiable model cards."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from epviz.backbones.zoo import build_zoo_vit, file_sha256

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("objective", ["sup", "mae", "ssl"])
def test_train_zoo_writes_weights_and_card(tmp_path, objective):
    train_zoo = load_script("train_zoo")
    train_zoo.main(
        [objective, "--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--eval-size", "64", "--out", str(tmp_path)]
    )
    weights = tmp_path / f"tiny-{objective}.safetensors"
    card = json.loads((tmp_path / f"tiny-{objective}.json").read_text())
    assert card["sha256"] == file_sha256(weights)
    assert card["training"]["steps"] == 2 and card["training"]["seed"] == 0
    state = load_file(str(weights))
    assert not any(k.startswith(("head.", "decoder")) for k in state), "only encoder weights are shipped"
    build_zoo_vit().load_state_dict(state)  # loads strictly into the zoo architecture
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"tiny-{objective}.json", f"tiny-{objective}.safetensors"]


SMALL_RUN = ["--items", "32", "--batch-size", "16", "--eval-size", "32", "--dtype", "fp16", "--threads", "1"]


def test_train_zoo_ships_checkpoints_along_one_run_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    train_zoo = load_script("train_zoo")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_zoo.main(["ssl", "--epochs", "3", "--save-at", "1", "--out", str(whole), *SMALL_RUN])
    assert sorted(p.name for p in whole.glob("*.safetensors")) == ["tiny-ssl@1.safetensors", "tiny-ssl@3.safetensors"]
    card = json.loads((whole / "tiny-ssl@1.json").read_text())
    assert card["training"]["checkpoint_epoch"] == 1 and [h["epoch"] for h in card["history"]] == [0]
    assert card["sha256"] == file_sha256(whole / "tiny-ssl@1.safetensors")
    assert {v.dtype for v in load_file(str(whole / "tiny-ssl@3.safetensors")).values()} == {torch.float16}

    evaluate, calls = train_zoo.evaluate, []

    def interrupted(*args):  # the run dies during its second epoch's evaluation
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(train_zoo, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_zoo.main(["ssl", "--epochs", "3", "--save-at", "1", "--out", str(parts), *SMALL_RUN])
    monkeypatch.setattr(train_zoo, "evaluate", evaluate)
    with pytest.raises(SystemExit, match="another command"):
        train_zoo.main(["ssl", "--epochs", "4", "--save-at", "1", "--out", str(parts), "--resume", *SMALL_RUN])
    train_zoo.main(["ssl", "--epochs", "3", "--save-at", "1", "--out", str(parts), "--resume", *SMALL_RUN])
    resumed, straight = load_file(str(parts / "tiny-ssl@3.safetensors")), load_file(str(whole / "tiny-ssl@3.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    history = json.loads((parts / "tiny-ssl@3.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]


def test_every_objective_starts_from_the_random_control():
    from epviz.backbones.zoo import random_state_dict

    train_zoo = load_script("train_zoo")
    for objective in ("mae", "ssl"):
        encoder, _ = train_zoo.build_model(objective, seed=0)
        assert all(torch.equal(v, random_state_dict()[k]) for k, v in encoder.state_dict().items())


def test_ssl_views_are_two_canvases_of_the_same_items():
    train_zoo = load_script("train_zoo")
    model = train_zoo.ContrastiveViews(build_zoo_vit())
    x = torch.randn(6, 3, 64, 64)
    loss, retrieval = model(x, x)  # identical views: every partner is the nearest
    assert torch.isfinite(loss) and retrieval == 1.0


def test_mae_loss_never_reads_the_cls_output():
    import torch

    train_zoo = load_script("train_zoo")
    model = train_zoo.MaskedAutoencoder(build_zoo_vit())
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["out"] = output

    model.encoder.norm.register_forward_hook(keep)
    loss = model(torch.randn(4, 3, 64, 64), torch.Generator().manual_seed(0))
    loss.backward()
    grad = captured["out"].grad  # (B, 1 + visible, D); row 0 is [CLS]
    assert torch.isfinite(loss)
    assert torch.count_nonzero(grad[:, 0]) == 0, "the loss must not depend on the [CLS] output"
    assert torch.count_nonzero(grad[:, 1:]) > 0


def test_patchify_round_trip():
    import torch

    train_zoo = load_script("train_zoo")
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    patches = train_zoo.patchify(images, 8)
    assert patches.shape == (2, 4, 8 * 8 * 3)
    assert torch.equal(patches[0, 1].reshape(8, 8, 3).permute(2, 0, 1), images[0, :, :8, 8:16])


def test_grid_check_finds_edge_runs_in_both_tables():
    import pandas as pd

    grid_check = load_script("grid_check")
    grid = {"lrs": (3e-4, 1e-3, 1e-1)}
    points = pd.DataFrame(
        {
            "backbone": ["a"] * 3 + ["b"] * 3,
            "probe": ["ep16"] * 6,
            "seed": [0] * 6,
            "lr": [3e-4, 1e-3, 1e-1] * 2,
            "weight_decay": [1e-4] * 6,
            "best_val_acc": [0.1, 0.2, 0.3, 0.4, 0.3, 0.2],
            "chosen": [False, False, True, True, False, False],
            "edge": [True, False, True] * 2,
        }
    )
    runs = grid_check.edge_runs(points, grid).set_index("backbone")
    assert runs["upper"].to_dict() == {"a": True, "b": False}
    assert runs.loc["b", "best_val_acc"] == 0.4

    results = pd.DataFrame(
        {
            "backbone": ["a", "a", "b", "b"],
            "probe": ["cls", "cls", "gap", "mhca"],
            "seed": [0, 1, 0, 0],
            "lr": [1e-1, 1e-1, 3e-4, 1e-3],
            "tuned": [True, False, True, True],
        }
    )
    runs = grid_check.edge_runs(results, grid)
    assert list(zip(runs["probe"], runs["upper"])) == [("cls", True), ("gap", False)], "tuned rows at an end only"
    assert runs["best_val_acc"].isna().all(), "a results table holds no grid val top-1"
    with pytest.raises(SystemExit, match="grid-points table"):
        grid_check.edge_runs(pd.DataFrame({"lr": [1e-1]}), grid)


def test_untrained_maps_measures_each_seed_and_summarises(tmp_path, monkeypatch, capsys):
    import pandas as pd

    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path / "cache"))
    script = load_script("untrained_maps")
    out = tmp_path / "untrained.csv"
    script.main(["--backbones", "tiny-random", "--probes", "ep16", "--seeds", "0", "1", "--images", "12", "--fast",
                 "--out", str(out)])  # fmt: skip
    table = pd.read_csv(out)
    assert table["init_seed"].tolist() == [0, 1] and (table["images"] == 12).all()
    assert (table["baseline"] == "untrained probe").all() and (table["predictors"] == 16).all()
    assert table["maxboxacc_v2"].between(table["maxboxacc_v2_min"], table["maxboxacc_v2_max"]).all()
    summary = script.summary(table)
    assert len(summary) == 1 and summary.loc[0, "seeds"] == 2
    assert summary.loc[0, "maxboxacc_v2"] == pytest.approx(table["maxboxacc_v2"].mean())
    assert table["mask_lift"].abs().max() < 0.01, "untrained maps are near uniform: no mass above chance"
    assert "written:" in capsys.readouterr().out


def test_halving_check_replays_the_rule_on_a_full_grid():
    halving_check = load_script("halving_check")
    curves = {0: [0.5, 0.6, 0.6, 0.6], 1: [0.4, 0.5, 0.7, 0.7], 2: [0.3, 0.4, 0.4, 0.4], 3: [0.1, 0.2, 0.5, 0.9]}
    history = [dict(point=p, epoch=e + 1, val_acc=a) for p, accs in curves.items() for e, a in enumerate(accs)]
    points = [
        dict(point=p, lr=10.0 ** -(4 - p), weight_decay=1e-4, best_val_acc=max(a), epochs_run=4, diverged=False)
        for p, a in curves.items()
    ]
    grid = dict(points=points, history=history, chosen=dict(point=3))
    # eta 2, 4 heads: rungs at epochs 1 and 2; point 3 (slow start, best at the end) stops at epoch 1 with point 2,
    # point 1 at epoch 2 (0.5 against point 0's 0.6), so point 0 is picked
    row = halving_check.replay(grid, epochs=4, eta=2)
    assert not row["same_pick"] and row["halving_lr"] == points[0]["lr"]
    assert row["val_given_up"] == pytest.approx(0.9 - 0.6)
    assert row["head_epochs_full"] == 16 and row["head_epochs_halving"] == 1 + 1 + 2 + 4
    curves[3] = [0.9, 0.9, 0.9, 0.95]
    history = [dict(point=p, epoch=e + 1, val_acc=a) for p, accs in curves.items() for e, a in enumerate(accs)]
    same = halving_check.replay(dict(grid, history=history), epochs=4, eta=2)
    assert same["same_pick"] and same["val_given_up"] == 0


def test_lift_check_measures_trained_heads_against_order_keeping_baselines(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path / "cache"))
    script = load_script("lift_check")
    out = tmp_path / "lift"
    script.main(["--fast", "--backbones", "tiny-random", "tiny-pixels", "--seeds", "0", "1", "--train", "128", "--test", "24",
                 "--lrs", "1e-2", "--out", str(out)])  # fmt: skip
    table, pairs = pd.read_csv(tmp_path / "lift.csv"), pd.read_csv(tmp_path / "lift_pairs.csv")
    assert len(table) == 2 * 4 * 2 and set(table["condition"]) == {
        "trained", "untrained", "untrained, matched entropy", "pixel salience"
    }  # fmt: skip
    untrained = table[table["condition"] == "untrained"]
    assert untrained["mask_lift"].abs().max() < 0.01, "an untrained head's maps are near uniform"
    matched = table.set_index(["backbone", "seed", "condition"])["entropy_norm"].unstack()
    assert np.allclose(matched["untrained, matched entropy"], matched["trained"], atol=2e-3)
    assert (pairs["lo"] <= pairs["estimate"]).all() and (pairs["estimate"] <= pairs["hi"]).all()
    covers = (pairs["lo"] <= 0) & (pairs["hi"] >= 0)
    assert (pairs.loc[covers, "verdict"] == "not resolved").all() and (pairs.loc[~covers, "verdict"] != "not resolved").all()
    monkeypatch.setattr(script, "measure_backbone", lambda *a: pytest.fail("a stored backbone is not measured again"))
    script.main(["--fast", "--backbones", "tiny-random", "tiny-pixels", "--seeds", "0", "1", "--train", "128", "--test", "24",
                 "--lrs", "1e-2", "--out", str(tmp_path / "again")])  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again_pairs.csv"), pairs)
    monkeypatch.undo()
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path / "cache"))
    script.main(["--fast", "--backbones", "tiny-random", "tiny-pixels", "--seeds", "0", "1", "--train", "128", "--test", "24",
                 "--lrs", "1e-2", "--salience", "0", "2", "--out", str(tmp_path / "salience")])  # fmt: skip
    table, pairs = pd.read_csv(tmp_path / "salience.csv"), pd.read_csv(tmp_path / "salience_pairs.csv")
    assert sorted(set(table["salience"])) == [0, 2] and len(table) == 2 * 2 * 4 * 2
    falls = pairs[pairs["a"].str.contains("fall 0->2")]
    assert set(falls["measure"]) == {"test_acc", "mask_lift"} and len(falls) == 2 * 2 + 2
    level0, level2 = (table[(table["salience"] == lv) & (table["condition"] == "trained")] for lv in (0, 2))
    fall = level0.set_index(["backbone", "seed"])["test_acc"] - level2.set_index(["backbone", "seed"])["test_acc"]
    own = falls[(falls["b"] == "no fall") & (falls["measure"] == "test_acc")].set_index("a")["estimate"]
    assert own["tiny-random fall 0->2"] == pytest.approx(fall["tiny-random"].mean()), "a fall is level 0 minus level 2"
    script.main(["--fast", "--backbones", "tiny-pixels", "--probe", "ep", "--queries", "2", "4", "--seeds", "0", "1",
                 "--train", "128", "--test", "24", "--lrs", "1e-2", "--out", str(tmp_path / "queries")])  # fmt: skip
    table, pairs = pd.read_csv(tmp_path / "queries.csv"), pd.read_csv(tmp_path / "queries_pairs.csv")
    assert sorted(set(table["queries"])) == [2, 4] and len(table) == 2 * 4 * 2
    assert set(table.loc[table["queries"] == 2, "entropy_norm"]) != set(table.loc[table["queries"] == 4, "entropy_norm"])
    sweep = pairs[pairs["a"] == "tiny-pixels M=2"]
    assert list(sweep["b"]) == ["tiny-pixels M=4"] * 2 and set(sweep["measure"]) == {"test_acc", "mask_lift"}
    from epviz.results import render_queries_section

    section = " ".join(render_queries_section(table, pairs).split())  # the README's finding, from these two files
    top1 = table[(table["condition"] == "trained") & (table["queries"] == 2)]["test_acc"].mean()
    assert f"2: {100 * top1:.1f} / " in section and "Top-1 against M = 4 (points): M = 2: " in section


def test_evidence_figure_draws_evidence_that_sums_to_the_logit(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path / "cache"))
    script = load_script("evidence_figure")
    out = tmp_path / "evidence"
    script.main(["--fast", "--backbone", "tiny-random", "--train", "96", "--images", "3", "--steps", "4", "--lrs", "1e-2",
                 "--out", str(out)])  # fmt: skip
    data = pd.read_csv(out.with_suffix(".csv"))
    assert len(data) == 3 and data["max_evidence_token"].between(0, 63).all()
    assert out.with_suffix(".png").stat().st_size > 10_000
