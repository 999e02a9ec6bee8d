"""The results table: rows with the leaderboard's columns and the maps' measures, the CSV, the README section."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from epviz import provenance, results
from epviz.analysis.intervals import percentile_interval
from epviz.tokens import TokenOrigin, TokenSet
from epviz.training import probe_zoo


@pytest.fixture(autouse=True)
def fresh_session():
    provenance.reset()
    yield
    provenance.reset()


def _runs(backbones=("tiny-mae", "tiny-random"), seed=0, test=(0.4, 0.6, 0.7)):
    rows = []
    for b, backbone in enumerate(backbones):
        for probe, params, predictors, acc in zip(("cls", "ep16", "mhca"), (1930, 5000, 60000), (0, 16, 3), test):
            rows.append(
                dict(
                    backbone=backbone,
                    layer=5,
                    probe=probe,
                    name=probe,
                    seed=seed,
                    params=params,
                    predictors=predictors,
                    num_classes=10,
                    val_acc=acc - 0.01,
                    test_acc=acc - 0.1 * b,
                    lr=1e-3,
                    weight_decay=1e-4,
                    tuned=True,
                )
            )
    return pd.DataFrame(rows)


def _table(backbone="tiny-mae", probe="ep16", k=4, seed=0):
    delta = np.linspace(0.01, 0.04, k)
    return pd.DataFrame(
        {
            "backbone": backbone,
            "layer": 5,
            "probe": probe,
            "seed": seed,
            "predictor": range(k),
            "delta_acc": delta,
            "delta_acc_lo": delta - 0.01,
            "delta_acc_hi": delta + 0.01,
            "maxboxacc_v2": 0.5,
            "maxboxacc_v2_lo": 0.4,
            "maxboxacc_v2_hi": 0.6,
            "inbox_mass": np.linspace(0.2, 0.4, k),
            "inbox_mass_lo": 0.1,
            "inbox_mass_hi": 0.5,
            "entropy_norm": 0.9,
        }
    )


class FakeBootstrap:
    """What results_rows reads of a Bootstrap: its resampled columns, (B, predictors) each."""

    def __init__(self, columns):
        self.columns = columns

    def samples(self):
        return self.columns


# --- rows -------------------------------------------------------------------------------------


def test_rows_carry_the_key_the_leaderboard_columns_and_lp_ep_of_their_group():
    rows = results.results_rows(_runs(), setting="full", dataset="cluttered-fashion-mnist", notebook="01")
    assert list(rows.columns) == list(results.RESULT_COLUMNS)
    assert len(rows) == 6 and not rows.duplicated(list(results.RESULT_KEY)).any()
    mae = rows[rows["backbone"] == "tiny-mae"].set_index("probe")
    assert mae.loc["cls", ["family", "method", "pretrain", "image_size"]].tolist() == [
        "MIM",
        "MAE",
        "cluttered Fashion-MNIST",
        64,
    ]
    assert set(mae["lp"]) == {0.4} and set(mae["ep"]) == {0.6}, "every row names LP and EP of its backbone"
    assert set(mae["ep_variant"]) == {"ep16"} and set(mae["ep_queries"]) == {16}
    random = rows[rows["backbone"] == "tiny-random"].set_index("probe")
    assert random.loc["mhca", "lp"] == pytest.approx(0.3) and random.loc["mhca", "family"] == "control"
    assert (
        set(rows["protocol"]) == {"cached"}
        and set(rows["setting"]) == {"full"}
        and set(rows["eval"]) == {"cluttered-fashion-mnist"}
    )
    assert set(rows["commit"]) == {provenance.git_commit()}
    assert rows["mean_delta_acc"].isna().all() and rows["probe_cache"].isna().all(), "no maps, no probe-cache run here"


def test_an_ep_row_is_its_own_ep_and_a_group_without_ep_or_lp_has_none():
    runs = _runs().assign(
        probe=lambda t: t["probe"].replace({"mhca": "ep16_d2"}), name=lambda t: t["name"].replace({"mhca": "ep16_d2"})
    )
    rows = results.results_rows(runs).set_index(["backbone", "probe"])
    assert (
        rows.loc[("tiny-mae", "ep16_d2"), "ep"] == pytest.approx(0.7)
        and rows.loc[("tiny-mae", "ep16_d2"), "ep_variant"] == "ep16_d2"
    )
    assert rows.loc[("tiny-mae", "cls"), "ep_variant"] == "ep16", "a non-EP row is compared with ep16"
    alone = results.results_rows(_runs()[lambda t: t["probe"] == "mhca"])
    assert alone["lp"].isna().all() and alone["ep"].isna().all() and alone["ep_variant"].isna().all()


def test_map_columns_are_means_over_predictors_with_the_tables_intervals():
    rows = results.results_rows(_runs(), _table()).set_index(["backbone", "probe"])
    ep = rows.loc[("tiny-mae", "ep16")]
    assert ep["mean_delta_acc"] == pytest.approx(0.025) and ep["mean_delta_acc_lo"] == pytest.approx(0.015)
    assert ep["mean_delta_acc_hi"] == pytest.approx(0.035) and ep["inbox_mass"] == pytest.approx(0.3)
    assert ep["maxboxacc_v2_lo"] == pytest.approx(0.4) and ep["entropy_norm"] == pytest.approx(0.9)
    assert np.isnan(ep["entropy_norm_lo"]), "no interval in the table, none invented"
    assert ep["maps_interval"] == "mean of the predictors' intervals"
    assert rows.drop(index=("tiny-mae", "ep16"))["mean_delta_acc"].isna().all()


def test_with_bootstrap_records_the_interval_is_that_of_the_mean():
    rng = np.random.default_rng(0)
    delta = pd.DataFrame(rng.normal(0.02, 0.01, size=(200, 4)))
    box = pd.DataFrame(rng.uniform(0.3, 0.7, size=(200, 4)))
    records = {("tiny-mae", "ep16"): FakeBootstrap({"delta_acc": delta, "maxboxacc_v2": box})}
    ep = results.results_rows(_runs(), _table(), records=records).set_index(["backbone", "probe"]).loc[("tiny-mae", "ep16")]
    lo, hi = percentile_interval(delta.to_numpy().mean(axis=1), 0.95)
    assert (ep["mean_delta_acc_lo"], ep["mean_delta_acc_hi"]) == pytest.approx((lo, hi))
    assert ep["mean_delta_acc_hi"] - ep["mean_delta_acc_lo"] < 0.02, "narrower than the predictors' own intervals"
    assert ep["maxboxacc_v2_lo"] == pytest.approx(percentile_interval(box.to_numpy().mean(axis=1), 0.95)[0])
    assert ep["inbox_mass_lo"] == pytest.approx(0.1), "a column without records keeps the table's bounds"
    assert ep["maps_interval"] == "bootstrap of the mean"


def test_runs_lacking_columns_or_rows_are_refused():
    with pytest.raises(ValueError, match="test_acc"):
        results.results_rows(_runs().drop(columns="test_acc"))
    with pytest.raises(ValueError, match="no runs"):
        results.results_rows(_runs().iloc[0:0])
    with pytest.raises(ValueError, match="delta_acc"):
        results.results_rows(_runs(), _table().drop(columns="delta_acc"))


def _tokens(n, seed, cache):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    patch = rng.standard_normal((n, 4, 8)).astype(np.float32) + labels[:, None, None]
    origin = TokenOrigin(backbone="toy", layer=1, cache=cache)
    return TokenSet(patch=patch, prefix=patch[:, :1].copy(), labels=labels, grid=(2, 2), origin=origin)


def test_every_row_carries_the_probe_cache_key_of_the_run_that_made_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path))
    train, val, test = _tokens(60, 0, "train-key"), _tokens(30, 1, "val-key"), _tokens(30, 2, "test-key")
    tokens = {"toy": {"train": train, "val": val, "test": test}}
    budget = {"epochs": 2, "warmup_epochs": 0}
    runs, _ = probe_zoo(tokens, {"ep2": {"name": "ep", "num_queries": 2}, "ep4": {"name": "ep", "num_queries": 4}}, budget=budget)
    rows = results.results_rows(runs, tokens=tokens).set_index("probe")
    keys = rows["probe_cache"]
    assert keys["ep2"] != keys["ep4"], "same family, other parameters: another run"
    for probe in ("ep2", "ep4"):
        assert rows.loc[probe, "log"] == f"probes/{keys[probe]}.history.csv"
        assert (tmp_path / rows.loc[probe, "log"]).is_file(), "the log is the entry's history CSV"
    assert rows.loc["ep2", "test_tokens"] == "test-key" and rows.loc["ep2", "train_tokens"] == "train-key"
    unkeyed = results.results_rows(runs.drop(columns="probe_cache"))
    assert unkeyed["probe_cache"].isna().all(), "a row without its run's key names no entry"


def test_backbone_facts_of_presets_random_controls_and_timm_names():
    assert results.backbone_facts("mae-vit-b") == {
        "family": "MIM",
        "method": "MAE",
        "arch": "ViT-B/16",
        "pretrain": "IN-1K",
        "image_size": None,
    }
    assert results.backbone_facts("dinov2-vit-l", {"image_size": [224, 224]})["image_size"] == 224
    assert results.backbone_facts("dinov2-vit-l")["family"] == "Hybrid"
    random = results.backbone_facts("mae-vit-b:random")
    assert random["family"] == "control" and random["pretrain"] == "none" and "random init" in random["method"]
    assert results.backbone_facts("vit_small_patch16_224.augreg_in21k")["arch"] == "ViT-S/16"
    assert results.backbone_facts("tiny-sup")["method"] == "supervised"


# --- the CSV ------------------------------------------------------------------------------------


def test_append_replaces_rows_of_the_same_key_and_keeps_the_others(tmp_path):
    path = tmp_path / "figures" / "results.csv"
    results.append_results(results.results_rows(_runs()), path)
    results.append_results(results.results_rows(_runs(seed=1)), path)
    assert len(results.read_results(path)) == 12
    newer = results.results_rows(_runs(test=(0.9, 0.9, 0.9)).iloc[:2])
    results.append_results(newer, path)
    table = results.read_results(path)
    assert len(table) == 12 and list(table.columns) == list(results.RESULT_COLUMNS)
    key = table.set_index(list(results.RESULT_KEY))["test_acc"]
    assert key[("tiny-mae", 5, "cls", "cached", 0)] == 0.9 and key[("tiny-mae", 5, "cls", "cached", 1)] == 0.4
    assert key[("tiny-mae", 5, "mhca", "cached", 0)] == 0.7
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.csv"], "no temporary file left"


def test_a_later_row_of_the_same_probe_keeps_what_it_lacks(tmp_path):
    path = tmp_path / "results.csv"
    first = results.results_rows(_runs(backbones=("tiny-mae",))).assign(probe_cache="ep-abc", log="probes/ep-abc.history.csv")
    results.append_results(first, path)
    ablation = _runs(backbones=("tiny-mae",)).query("probe == 'ep16'")
    second = results.results_rows(ablation, _table(), notebook="02").assign(probe_cache="ep-abc")
    assert second["lp"].isna().all(), "notebook 02 trains no LP"
    results.append_results(second, path)
    row = results.read_results(path).query("probe == 'ep16'").iloc[0]
    assert row["lp"] == 0.4 and row["mean_delta_acc"] == pytest.approx(0.025) and row["notebook"] == "02"
    assert row["log"] == "probes/ep-abc.history.csv"
    other = second.assign(probe_cache="ep-other", test_acc=0.1)  # another trained probe: nothing carried over
    results.append_results(other, path)
    assert pd.isna(results.read_results(path).query("probe == 'ep16'").iloc[0]["lp"])


def test_append_refuses_rows_without_a_key_or_twice_the_same_key(tmp_path):
    rows = results.results_rows(_runs())
    with pytest.raises(ValueError, match="key columns"):
        results.append_results(rows.drop(columns="protocol"), tmp_path / "r.csv")
    with pytest.raises(ValueError, match="same key more than once"):
        results.append_results(pd.concat([rows, rows.iloc[:1]]), tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()


def test_a_failed_write_leaves_the_stored_table_intact(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    results.append_results(results.results_rows(_runs()), path)
    before = path.read_bytes()

    def broken(self, target, *args, **kwargs):
        Path(target).write_text("backbone,lay")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        results.append_results(results.results_rows(_runs(seed=3)), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


# --- the README section ---------------------------------------------------------------------------


def test_the_section_of_no_run_says_so():
    missing, empty = results.render_section(None), results.render_section(results.read_results("/nonexistent.csv"))
    for section in (missing, empty):
        assert section.startswith(results.START) and section.endswith(results.END) and results.NO_RUN in section
    assert "does not exist" in missing and "holds no rows" in empty


def test_the_section_aggregates_seeds_and_shows_intervals():
    rows = pd.concat(
        [results.results_rows(_runs(), _table()), results.results_rows(_runs(seed=1, test=(0.5, 0.8, 0.7)))], ignore_index=True
    )
    rows["setting"] = "full"
    section = results.render_section(rows)
    line = next(x for x in section.splitlines() if x.startswith("| tiny-mae | 5 | ep16 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4:8] == ["2", "70.0 ± 14.1", "45.0", "70.0 (ep16, 16)"]
    assert cells[8:] == ["2.5 [1.5, 3.5]", "0.50 [0.40, 0.60]", "0.30 [0.10, 0.50]", "0.90"]
    assert "| tiny-mae | MIM | MAE | ViT-tiny/8 (D=192, 6 blocks) | cluttered Fashion-MNIST | 64 |" in section
    ordered = [x.split("|")[3].strip() for x in section.splitlines() if x.startswith("| tiny-mae | 5 |")]
    assert ordered == ["ep16", "mhca", "cls"], "best top-1 first"
    single = results.results_rows(
        _runs().assign(test_acc_lo=lambda d: d["test_acc"] - 0.05, test_acc_hi=lambda d: d["test_acc"] + 0.04)
    )
    assert {"test_acc_lo", "test_acc_hi"} <= set(single.columns)
    line = next(
        x for x in results.render_section(single.assign(setting="full")).splitlines() if x.startswith("| tiny-mae | 5 | ep16 |")
    )
    assert [c.strip() for c in line.strip("|").split("|")][5] == "60.0 [55.0, 64.0]", "a single run shows its test interval"


def test_write_then_check_and_a_stale_section_fails(tmp_path):
    readme, csv = tmp_path / "README.md", tmp_path / "docs" / "results.csv"
    readme.write_text(f"# project\n\nintro\n\n{results.START}\nold\n{results.END}\n\nmore\n")
    assert "not what" in results.check_readme(readme, csv)
    results.write_readme(readme, csv)
    assert csv.is_file() and results.read_results(csv).empty
    assert results.check_readme(readme, csv) is None
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n\n") and text.endswith("\n\nmore\n") and "holds no rows" in text
    results.append_results(results.results_rows(_runs()), csv)
    problem = results.check_readme(readme, csv)
    assert "epviz results --write" in problem and "+| tiny-mae |" in problem
    results.write_readme(readme, csv)
    assert results.check_readme(readme, csv) is None
    csv.unlink()
    assert "does not exist" in results.check_readme(readme, csv)


def test_a_readme_without_markers_fails_the_check_and_gets_a_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n")
    assert "no results section" in results.check_readme(readme, tmp_path / "r.csv")
    results.write_readme(readme, tmp_path / "r.csv")
    assert "## Results" in readme.read_text() and results.check_readme(readme, tmp_path / "r.csv") is None
    readme.write_text(f"{results.END}\n{results.START}\n")
    with pytest.raises(ValueError, match="markers"):
        results.check_readme(readme, tmp_path / "r.csv")


def test_publish_refuses_fast_rows(tmp_path):
    source, target = tmp_path / "figures" / "results.csv", tmp_path / "docs" / "results.csv"
    with pytest.raises(FileNotFoundError, match="make figures"):
        results.publish(source, target)
    results.append_results(results.results_rows(_runs(), setting="fast"), source)
    with pytest.raises(ValueError, match="fast-mode rows"):
        results.publish(source, target)
    results.append_results(results.results_rows(_runs(), setting="full"), source)
    results.publish(source, target)
    assert results.read_results(target).equals(results.read_results(source))


def test_the_committed_readme_section_is_what_the_committed_csv_gives():
    root = Path(__file__).resolve().parents[1]
    assert results.check_readme(root / "README.md", root / "docs" / "results.csv") is None


def lift_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [
        {"backbone": b, "probe": "ep16", "condition": c, "seed": s, "test_acc": 0.7 + 0.01 * s, "mask_lift": lift + 0.01 * s,
         "maxboxacc_v2": 0.4}
        for b in ("tiny-mae", "tiny-random")
        for c, lift in (("trained", 0.4), ("untrained", 0.0), ("untrained, matched entropy", 0.1), ("pixel salience", 0.3))
        for s in (0, 1)
    ]  # fmt: skip
    pairs = pd.DataFrame(
        [
            {
                "a": "tiny-mae trained",
                "b": "tiny-random trained",
                "measure": "mask_lift",
                "estimate": 0.05,
                "lo": -0.01,
                "hi": 0.11,
                "images": 10,
                "verdict": "not resolved",
                "seeds": 2,
            }
        ]  # fmt: skip
    )
    return pd.DataFrame(rows), pairs


def written_readme(tmp_path, stem: str, table: pd.DataFrame, pairs: pd.DataFrame, section: str) -> tuple[Path, Path]:
    """README.md holding `section` and an empty results section, rebuilt from <stem>.csv, <stem>_pairs.csv and a
    results.csv of no rows beside it, and checked; returns the README and results.csv."""
    csv = tmp_path / "results.csv"
    csv.write_text(",".join(results.RESULT_COLUMNS) + "\n")
    table.to_csv(tmp_path / f"{stem}.csv", index=False)
    pairs.to_csv(tmp_path / f"{stem}_pairs.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"{section}\n\n{results.START}\n{results.END}\n")
    results.write_readme(readme, csv)
    assert results.check_readme(readme, csv) is None
    return readme, csv


def test_the_localization_section_is_checked_against_its_csvs(tmp_path):
    table, pairs = lift_tables()
    readme, csv = written_readme(tmp_path, "lift", table, pairs, f"# x\n\n{results.LIFT_START}\nold\n{results.LIFT_END}")
    text = readme.read_text()
    assert "| tiny-mae | 70.5 ± 0.7 | 0.405 ± 0.007 | 0.005 | 0.105 | 0.305 | – | +0.050 [-0.010, +0.110] n.r. |" in text
    table.loc[0, "mask_lift"] = 0.9  # a changed number fails the check
    table.to_csv(tmp_path / "lift.csv", index=False)
    assert "not what lift.csv" in results.check_readme(readme, csv)
    readme.write_text(f"{results.START}\n{results.END}\n")
    results.write_readme(readme, csv)
    assert "no localization section" in results.check_readme(readme, csv)


def test_the_localization_section_reads_the_mae_run_along_its_epochs(tmp_path):
    """With checkpoints of the zoo's MAE run in lift.csv, one generated line reads them in epoch order, from the CSVs."""
    table, pairs = lift_tables()
    more = table[table["backbone"] == "tiny-mae"]
    table = pd.concat([table, more.assign(backbone="tiny-mae@20", test_acc=0.8), more.assign(backbone="tiny-mae@2")])
    gain = dict(pairs.iloc[0], a="tiny-random trained", b="tiny-mae@20 trained")
    pairs = pd.DataFrame([*pairs.to_dict("records"), dict(gain, measure="test_acc", estimate=-0.1, lo=-0.15, hi=-0.05),
                          dict(gain, estimate=-0.02, lo=-0.05, hi=0.01)])  # fmt: skip
    section = results.render_lift_section(table, pairs)
    line = next(x for x in section.splitlines() if x.startswith("Along one MAE run"))
    random = 100 * table.loc[(table["backbone"] == "tiny-random") & (table["condition"] == "trained"), "test_acc"].mean()
    assert f"epochs 0 / 2 / 20: top-1 {random:.1f} / 70.5 / 80.0" in line
    assert "epoch 20 − epoch 0: top-1 +10.0 [+5.0, +15.0] points, lift +0.020 [-0.010, +0.050] n.r." in line
    assert "Along one MAE run" not in results.render_lift_section(table[table["backbone"] != "tiny-mae@2"], pairs)


def salience_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [
        {"salience": lv, "backbone": b, "condition": "trained", "seed": s, "test_acc": acc - 0.2 * lv, "mask_lift": 0.4 - 0.1 * lv}
        for lv in (0, 2)
        for b, acc in (("tiny-mae", 0.7), ("tiny-random", 0.6))
        for s in (0, 1)
    ]  # fmt: skip

    def pair(a, b, measure, estimate, lo, hi):
        return {"salience": 2, "a": a, "b": b, "measure": measure, "estimate": estimate, "lo": lo, "hi": hi, "images": 10}

    pairs = [
        pair(f"{name} fall 0->2", "no fall", measure, 0.4, 0.3, 0.5)
        for name in ("tiny-mae", "tiny-random")
        for measure in ("test_acc", "mask_lift")
    ]
    pairs += [
        pair("tiny-mae fall 0->2", "tiny-random fall 0->2", "test_acc", -0.02, -0.05, 0.01),
        pair("tiny-mae fall 0->2", "tiny-random fall 0->2", "mask_lift", 0.0, -0.01, 0.01),
        pair("tiny-mae trained", "tiny-random trained", "mask_lift", 0.08, 0.06, 0.1),
    ]
    return pd.DataFrame(rows), pd.DataFrame(pairs)


def test_the_salience_finding_is_generated_from_its_csvs_and_checked(tmp_path):
    table, pairs = salience_tables()
    readme, csv = written_readme(tmp_path, "salience", table, pairs, f"{results.SALIENCE_START}\nold\n{results.SALIENCE_END}")
    text = " ".join(readme.read_text().split())  # the paragraph, its line breaks aside
    assert "top-1 falls by +40.0 [+30.0, +50.0] points on tiny-mae" in text
    assert "(difference of the falls -2.0 [-5.0, +1.0] n.r.)" in text, "an interval covering 0 reads n.r."
    assert "At level 2 the two lose their mass on the item alike (not resolved)" in text, "the reading follows the verdict"
    assert "(top-1 30.0 against 20.0, lift 0.200 against 0.200; tiny-mae − tiny-random: +0.080 [+0.060, +0.100])" in text
    pairs.loc[0, "estimate"] = 0.45  # a changed number fails the check
    pairs.to_csv(tmp_path / "salience_pairs.csv", index=False)
    assert "not what salience.csv" in results.check_readme(readme, csv)
