import json

import pytest

from epviz import cli


def test_extract_command_reports_a_cache(tmp_path, capsys):
    args = ["extract", "--backbone", "tiny-random", "--size", "12", "--layers", "0", "-1", "--cache-dir", str(tmp_path)]
    cli.main(args)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["layers"] == [0, 5] and first["images"] == 12 and not first["hit"]
    cli.main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hit"]


def test_extract_takes_any_dataset_spec_the_full_split_and_the_storage_options(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (80 * i, 40, 200)).save(tmp_path / "images" / split / cls / f"{i}.png")
    args = ["extract", "--backbone", "tiny-random", "--dataset", f"imagefolder:{tmp_path / 'images'}", "--split", "test",
            "--size", "all", "--dtype", "int8", "--views", "2", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    cli.main(args)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 6 and out["views"] == 2 and out["dtype"] == "int8" and out["world_size"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "0"], "at least 1 image"),
        (["--size", "many"], "'all'"),
    ],
)
def test_extract_refuses_bad_sizes(args, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["extract", *args])
    assert message in capsys.readouterr().err


def test_extract_errors_are_one_line_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="epviz extract: .*does not exist"):
        cli.main(["extract", "--dataset", f"imagefolder:{tmp_path / 'nowhere'}", "--cache-dir", str(tmp_path)])


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def _notebook(path, *sources: str, parameters: bool = True) -> None:
    """A notebook of code cells, the first tagged ``parameters`` (``FAST = False``) unless `parameters` is False."""
    import nbformat

    cells = [nbformat.v4.new_code_cell(source) for source in sources]
    if parameters:
        cells.insert(0, nbformat.v4.new_code_cell("FAST = False  # True: small sizes", metadata={"tags": ["parameters"]}))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_a_failing_notebook_does_not_stop_the_others(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    _notebook(tmp_path / "notebooks" / "01_bad.ipynb", "raise ValueError('no such backbone')")
    _notebook(tmp_path / "notebooks" / "02_good.ipynb", "open('ran.txt', 'w').write(f'fast={FAST}')")
    _notebook(tmp_path / "notebooks" / "03_no_parameters.ipynb", "open('ran3.txt', 'w').write('yes')", parameters=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="2 notebook\\(s\\) failed: 01_bad.ipynb, 03_no_parameters.ipynb"):
        cli.main(["reproduce", "--fast"])
    assert (tmp_path / "notebooks" / "ran.txt").read_text() == "fast=True", "fast mode is set in the parameters cell"
    assert not (tmp_path / "notebooks" / "ran3.txt").exists(), "a notebook fast mode cannot reach does not run in full"
    report = (tmp_path / "figures" / "fast" / "report.html").read_text()
    assert "ValueError: no such backbone" in report and "no cell tagged &#x27;parameters&#x27;" in report
    assert (tmp_path / "figures" / "fast" / "notebooks" / "01_bad.ipynb").is_file()


# --- evaluate -----------------------------------------------------------------------------------


@pytest.fixture
def saved_probe(tmp_path, monkeypatch):
    """An EP16 probe for tiny-random's tokens (D=192, 10 classes), saved; training and the probe cache made to fail."""
    import sys

    import epviz.training
    from epviz.probes import build
    from epviz.training import save_probe

    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path / "cache"))

    def no_training(*args, **kwargs):
        raise AssertionError("epviz evaluate trained something")

    for module, names in (
        (epviz.training, ("fit", "fit_grid", "tune", "train_probe")),
        (sys.modules["epviz.training.fit"], ("fit",)),
        (sys.modules["epviz.training.probe_cache"], ("fit", "tune", "fit_or_load", "store_fit")),
        (sys.modules["epviz.training.runs"], ("fit_or_load",)),
    ):
        for name in names:
            monkeypatch.setattr(module, name, no_training)
    probe = build("ep16", 192, 10, seed=0)
    return probe, save_probe(probe, tmp_path / "probe", {"fit": {"train_origin": {"backbone": "tiny-random", "layer": 5}}})


def _evaluate_args(probe, tmp_path, *extra):
    return [
        "evaluate", "--probe", str(probe), "--backbone", "tiny-random", "--dataset", "cluttered-fashion-mnist",
        "--split", "test", "--size", "12", "--cache-dir", str(tmp_path / "cache"), *extra,
    ]  # fmt: skip


def test_evaluate_scores_a_saved_probe_and_trains_nothing(saved_probe, tmp_path, capsys):
    import pandas as pd

    from epviz import accuracy, extract_tokens, load_backbone
    from epviz.data import load_split

    probe, base = saved_probe
    cli.main(_evaluate_args(base, tmp_path, "--out", str(tmp_path / "scores.csv")))
    printed = capsys.readouterr().out
    assert "top1" in printed and "top5" in printed
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 1 and scores.loc[0, "images"] == 12 and scores.loc[0, "layer"] == 5
    tokens = extract_tokens(load_backbone("tiny-random"), load_split("cluttered-fashion-mnist", "test", 12), [5],
                            cache_dir=tmp_path / "cache").tokens(5)  # fmt: skip
    expected = accuracy(probe, tokens, topk=(1, 5))
    assert (scores.loc[0, "top1"], scores.loc[0, "top5"]) == pytest.approx((expected["top1"], expected["top5"]))
    for k in ("top1", "top5"):  # the bootstrap interval over the 12 images
        assert scores.loc[0, f"{k}_lo"] <= scores.loc[0, k] <= scores.loc[0, f"{k}_hi"]
        assert scores.loc[0, f"{k}_lo"] < scores.loc[0, f"{k}_hi"] or scores.loc[0, k] in (0.0, 1.0)
    assert scores.loc[0, "token_cache"] == tokens.origin.cache
    assert not (tmp_path / "cache" / "probes").exists(), "the probe cache is not touched"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [tokens.origin.cache], "only the split's tokens"


def test_evaluate_with_maps_writes_the_predictor_table(saved_probe, tmp_path, capsys):
    import pandas as pd

    _, base = saved_probe
    cli.main(_evaluate_args(base, tmp_path, "--maps", "--n-boot", "20", "--out", str(tmp_path / "maps.csv")))
    printed = capsys.readouterr().out
    assert "mean over predictors" in printed and "chance, the trivial maps on the same boxes" in printed
    table = pd.read_csv(tmp_path / "maps.csv")
    assert table["predictor"].tolist() == list(range(16))
    for column in ("delta_acc", "delta_acc_lo", "delta_acc_hi", "entropy_norm", "maxboxacc_v2", "inbox_mass", "top1", "top5"):
        assert table[column].notna().all(), column
    assert table["entropy_norm"].between(0, 1 + 1e-6).all() and (table["top5"] >= table["top1"]).all()
    assert {"top1_lo", "top1_hi", "backbone", "layer"} <= set(table.columns)
    assert not (tmp_path / "cache" / "probes").exists()
    # chance beside the probe's maps: the trivial maps on the same boxes, the random ones as peaked as the probe's
    chance = pd.read_csv(tmp_path / "maps_chance.csv")
    assert set(chance["baseline"]) == {"uniform", "centre prior", "random, matched entropy", "pixel salience, matched entropy"}
    assert chance.loc[chance["baseline"] == "uniform", "maxboxacc_v2"].item() == 0
    matched = chance.loc[chance["baseline"] == "random, matched entropy", "entropy_norm"].item()
    assert matched == pytest.approx(table["entropy_norm"].mean(), abs=1e-3)


def test_evaluate_refuses_a_probe_of_another_width_and_a_missing_file(tmp_path, monkeypatch):
    from epviz.probes import build
    from epviz.training import save_probe

    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path / "cache"))
    base = save_probe(build("gap", 64, 10, seed=0), tmp_path / "narrow")
    with pytest.raises(SystemExit, match="width 64 but tiny-random gives 192"):
        cli.main(_evaluate_args(base, tmp_path))
    with pytest.raises(SystemExit, match="no saved probe"):
        cli.main(_evaluate_args(tmp_path / "absent", tmp_path))


def test_evaluate_reads_reference_heads_through_load_reference_head(saved_probe, tmp_path, monkeypatch):
    import pandas as pd

    from epviz.training import save_reference_head

    probe, base = saved_probe
    head = save_reference_head(probe, tmp_path / "release" / "my_head")
    assert head.suffix == ".pth"
    cli.main(_evaluate_args(base, tmp_path, "--out", str(tmp_path / "saved.csv")))
    cli.main(_evaluate_args(head, tmp_path, "--layer", "-1", "--out", str(tmp_path / "file.csv")))
    cli.main(_evaluate_args(head.parent, tmp_path, "--layer", "-1", "--out", str(tmp_path / "folder.csv")))
    saved, file, folder = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("saved", "file", "folder"))
    assert file.loc[0, "probe_file"] == str(head) and folder.loc[0, "probe_file"] == str(head.parent)
    for scores in (file, folder):
        assert (scores.loc[0, "top1"], scores.loc[0, "top5"]) == pytest.approx((saved.loc[0, "top1"], saved.loc[0, "top5"]))
    assert not (tmp_path / "cache" / "probes").exists()


# --- results ------------------------------------------------------------------------------------


def _checkout(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "README.md").write_text("# x\n\n<!-- results:start -->\n<!-- results:end -->\n")
    monkeypatch.chdir(tmp_path)


def test_results_check_fails_until_write_rebuilds_the_section(tmp_path, monkeypatch, capsys):
    _checkout(tmp_path, monkeypatch)
    with pytest.raises(SystemExit, match="epviz results --write"):
        cli.main(["results", "--check"])
    cli.main(["results", "--write"])
    assert (tmp_path / "docs" / "results.csv").is_file() and "No full run" in (tmp_path / "README.md").read_text()
    cli.main(["results", "--check"])
    assert "is what docs/results.csv gives" in capsys.readouterr().out


def test_results_write_publishes_a_full_runs_table(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from epviz.results import append_results, read_results, results_rows

    _checkout(tmp_path, monkeypatch)
    runs = pd.DataFrame({"backbone": "tiny-mae", "layer": 5, "probe": ["cls", "ep16"], "seed": 0, "test_acc": [0.4, 0.6]})
    append_results(results_rows(runs, setting="full"), tmp_path / "figures" / "results.csv")
    cli.main(["results", "--write"])
    assert len(read_results(tmp_path / "docs" / "results.csv")) == 2
    readme = (tmp_path / "README.md").read_text()
    assert "| tiny-mae | 5 | ep16 | cached | 1 | 60.0 | 40.0 |" in readme
    cli.main(["results", "--check"])
    append_results(results_rows(runs.assign(seed=1), setting="full"), tmp_path / "figures" / "results.csv")
    cli.main(["results", "--check"])
    assert "differs from docs/results.csv" in capsys.readouterr().out, "an unpublished run is pointed out"
    append_results(results_rows(runs.assign(seed=2), setting="fast"), tmp_path / "figures" / "results.csv")
    with pytest.raises(SystemExit, match="^epviz results: .*fast-mode rows"):
        cli.main(["results", "--write"])


def test_results_of_an_empty_or_malformed_table_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    _checkout(tmp_path, monkeypatch)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SystemExit, match=r"^epviz results: \S*empty.csv is empty, not a results table"):
        cli.main(["results", "--csv", str(tmp_path / "empty.csv")])
    (tmp_path / "ragged.csv").write_text("backbone,layer,probe,protocol,seed\ntiny-mae,5,ep,cached,0\n1,2,3,4,5,6,7\n")
    with pytest.raises(SystemExit, match=r"^epviz results: \S*ragged.csv is not a readable CSV table \(ParserError"):
        cli.main(["results", "--csv", str(tmp_path / "ragged.csv")])


# --- errors: one line naming the file, the traceback with -v -------------------------------------


def test_a_hostile_probe_is_one_line_and_verbose_shows_the_traceback(saved_probe, tmp_path):
    from epviz.errors import WeightsError

    _, base = saved_probe
    doc = json.loads((tmp_path / "probe.json").read_text())
    doc["probe"]["num_classes"] = 10**9  # built as it said, a 3 GB allocation and a 24-line traceback before
    (tmp_path / "probe.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit) as exit_:
        cli.main(_evaluate_args(base, tmp_path))
    message = str(exit_.value.code)
    assert (
        message.startswith("epviz evaluate: ")
        and "probe.json: probe field 'num_classes' must be an integer in [1, 100000], got 1000000000" in message
    )
    assert "\n" not in message and "Traceback" not in message
    with pytest.raises(WeightsError, match="probe field 'num_classes'"):
        cli.main(["-v", *_evaluate_args(base, tmp_path)])


def test_multi_line_messages_become_one_line(saved_probe, tmp_path):
    from epviz.probes import build
    from epviz.training import save_probe

    _, base = saved_probe
    save_probe(build("gap", 192, 7), tmp_path / "other")
    (tmp_path / "other.safetensors").replace(tmp_path / "probe.safetensors")  # the fit check's message has several lines
    with pytest.raises(SystemExit) as exit_:
        cli.main(_evaluate_args(base, tmp_path))
    message = str(exit_.value.code)
    assert message.startswith("epviz evaluate: ") and "probe.safetensors does not fit" in message and "\n" not in message
    assert "; missing keys: queries" in message


def test_the_exit_statuses_are_documented(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    assert "-v, --verbose" in help_text and "exit status:" in help_text and "'epviz <command>: <message>'" in help_text


# --- progress and report ------------------------------------------------------------------------


@pytest.mark.slow
def test_reproduce_prints_cells_keeps_timings_and_reports_figures(tmp_path, monkeypatch, capsys):

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    source = (
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nfrom epviz.viz import save_figure\n"
        "fig, ax = plt.subplots()\nsave_figure(fig, None, '01_dot', '../figures/fast', provenance={'images': [7]})"
    )
    _notebook(tmp_path / "notebooks" / "01_dot.ipynb", source)
    monkeypatch.chdir(tmp_path)
    cli.main(["reproduce", "--fast"])
    out = capsys.readouterr().out
    assert "[1/1] 01_dot.ipynb (first run)" in out and "[01_dot cell 2/2] import matplotlib - at" in out
    assert "[01_dot cell 1/2] FAST = True  # True: small sizes - at" in out and "[01_dot cell 2/2] done in" in out
    timings = json.loads((tmp_path / "figures" / "fast" / "timings.json").read_text())
    entry = timings["notebooks"]["01_dot.ipynb"]
    assert entry["status"] == "ok" and set(entry["cells"]) == {"0", "1"}
    report = (tmp_path / "figures" / "fast" / "report.html").read_text()
    assert "<a href='#fig-01_dot'>01_dot</a> (<a href='01_dot.json'>provenance</a>)" in report
    assert json.loads((tmp_path / "figures" / "fast" / "01_dot.json").read_text())["images"] == [7]
    cli.main(["reproduce", "--fast"])
    assert "[1/1] 01_dot.ipynb (previous run " in capsys.readouterr().out


TRAIN = ["train", "--backbone", "tiny-random", "--probes", "gap", "ep16", "--setting", "fast",
         "--sizes", "train=128", "val=64", "test=64"]  # fmt: skip


def test_train_tunes_every_probe_and_writes_the_runs(tmp_path, monkeypatch, capsys):
    import pandas as pd

    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path / "cache"))
    cli.main([*TRAIN, "--out", str(tmp_path / "runs.csv")])
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert runs["probe"].tolist() == ["gap", "ep16"] and runs["tuned"].all() and not runs["cached"].any()
    assert runs["test_acc"].between(0, 1).all()
    assert "gap" in capsys.readouterr().out
    cli.main([*TRAIN, "--out", str(tmp_path / "again.csv")])
    assert pd.read_csv(tmp_path / "again.csv")["cached"].all(), "a second run loads the probes from the probe cache"


def test_train_refuses_bad_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match="--sizes takes split=count"):
        cli.main([*TRAIN[:-3], "train128"])


def test_torchrun_train_lands_in_the_probe_cache_one_process_reads(tmp_path):
    import os
    import subprocess
    import sys

    import pandas as pd

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", EPVIZ_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "epviz", *TRAIN,
               "--out", str(tmp_path / "ddp.csv")]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = pd.read_csv(tmp_path / "ddp.csv")
    assert not ddp["cached"].any() and ddp["tuned"].all()
    single = subprocess.run([sys.executable, "-m", "epviz", *TRAIN, "--out", str(tmp_path / "one.csv")], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    one = pd.read_csv(tmp_path / "one.csv")
    assert one["cached"].all(), "the two-rank runs are found under the keys one process computes"
    assert one["test_acc"].tolist() == ddp["test_acc"].tolist() and one["lr"].tolist() == ddp["lr"].tolist()


def test_train_per_step_on_canvases_says_it_needs_image_files(tmp_path, monkeypatch):
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match="epviz train: the per-step protocol augments the image files"):
        cli.main([*TRAIN[:4], "gap", "--protocol", "per-step", "--setting", "fast", "--sizes", "train=16", "val=8", "test=8"])
