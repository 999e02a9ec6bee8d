"""The reference implementation's heads: its EP math, its checkpoints and releases, round trips; model cards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import epviz.probes as probes
from epviz.errors import ConfigError, WeightsError
from epviz.tokens import TokenOrigin, TokenSet
from epviz.training import (
    fit,
    load_probe,
    load_reference_head,
    read_model_card,
    save_probe,
    save_reference_head,
    tune,
)
from tests.data.formats import reference_head_state, write_reference_checkpoint, write_reference_release

D, C = 16, 5


class Stranger:
    """A class no allow-list knows: a checkpoint that pickles one must be refused."""


def tokens(batch: int = 3, num_patch: int = 9, num_prefix: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_patch, D, generator=g) * 2, torch.randn(batch, num_prefix, D, generator=g) * 2


def reference_logits(state: dict, patch: torch.Tensor, cls: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The paper's formulas written out on the reference's tensors (not through epviz).

    EP: a = softmax over the keys of (u_j / sqrt(D)) . x; y_j = sum_l a_jl (W_V x_l)[j c : (j + 1) c];
    the keys are the patch tokens, with the [CLS] token in front for ep_all. LP: y = [CLS] or the patch mean.
    Then (y - mean) / sqrt(var + 1e-6) and the classifier.
    """
    if kind in ("ep", "ep_all"):
        keys = patch if kind == "ep" else torch.cat([cls, patch], dim=1)
        u = state["0.cls_token"][0]
        m, dim = u.shape
        attn = torch.softmax(torch.einsum("md,bld->bml", u / dim**0.5, keys), dim=-1)
        values = keys @ state["0.v.weight"].T
        c = values.shape[-1] // m
        y = torch.cat([torch.einsum("bl,blc->bc", attn[:, j], values[..., j * c : (j + 1) * c]) for j in range(m)], dim=1)
        bn, fc = "1", "2"
    else:
        y = cls[:, 0] if kind == "cls" else patch.mean(dim=1)
        bn, fc = "0", "1"
    y = (y - state[f"{bn}.running_mean"]) / torch.sqrt(state[f"{bn}.running_var"] + 1e-6)
    return y @ state[f"{fc}.weight"].T + state[f"{fc}.bias"]


def random_probe(name: str, seed: int = 0, **options) -> probes.Probe:
    """A probe with random weights and BatchNorm statistics, in eval mode."""
    probe = probes.build(name, D, C, seed=seed, **options).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        probe.norm.running_mean.copy_(torch.randn(probe.width, generator=g))
        probe.norm.running_var.copy_(torch.rand(probe.width, generator=g) + 0.5)
        probe.head.bias.copy_(torch.randn(C, generator=g))
    return probe


# --- the reference's math is epviz's ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "d_out"),
    [("ep", "ep", 1), ("ep", "ep", 2), ("ep", "ep_all", 1), ("lp", "cls", 1), ("lp", "pos", 1)],
)
def test_reference_heads_compute_the_reference_logits(tmp_path, kind, name, d_out):
    state = reference_head_state(kind, dim=D, num_classes=C, num_queries=4, d_out=d_out)
    file = write_reference_release(tmp_path / "head", state, cls_features=name)
    probe = load_reference_head(file)
    patch, cls = tokens()
    expected = reference_logits(state, patch, cls, {"pos": "gap"}.get(name, name))
    torch.testing.assert_close(probe(patch, cls), expected, atol=1e-5, rtol=1e-5)
    assert probe.name == {"pos": "gap"}.get(name, name) and not probe.training
    if kind == "ep":
        assert probe.num_queries == 4 and probe.d_out == d_out  # from the shapes: the exporter's meta says d_out 1
        torch.testing.assert_close(probe.queries, state["0.cls_token"][0])
        torch.testing.assert_close(probe.value.weight, state["0.v.weight"])
        maps = probe.attention(patch, cls)
        assert maps.shape == (3, 4, 9)
        torch.testing.assert_close(maps.sum(-1), torch.ones(3, 4))


def test_ep_all_reads_one_cls_key_or_the_prefix_mean_for_timm_runs(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C)
    patch, prefix = tokens(num_prefix=3)  # [CLS] and two registers
    first = load_reference_head(write_reference_release(tmp_path / "hub", state, cls_features="ep_all", loader="hub"))
    mean = load_reference_head(write_reference_release(tmp_path / "timm", state, cls_features="ep_all", loader="timm"))
    assert first.prefix == "first" and mean.prefix == "mean"
    torch.testing.assert_close(first(patch, prefix), reference_logits(state, patch, prefix[:, :1], "ep_all"))
    torch.testing.assert_close(mean(patch, prefix), reference_logits(state, patch, prefix.mean(1, keepdim=True), "ep_all"))
    chosen = load_reference_head(tmp_path / "timm", config={"prefix": "all"})
    assert chosen.prefix == "all"


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ep", {"num_queries": 4, "d_out": 1}),
        ("ep", {"num_queries": 4, "d_out": 2}),
        ("ep_all", {"num_queries": 8}),
        ("ep_all", {"num_queries": 4, "prefix": "mean"}),
        ("cls", {}),
        ("gap", {}),
    ],
)
def test_round_trip_through_the_release_format_keeps_the_logits(tmp_path, name, options):
    probe = random_probe(name, **options)
    file = save_reference_head(probe, tmp_path / "release", meta={"method": "MAE", "arch": "ViT-B/16", "head_epoch": 12})
    assert file == tmp_path / "release" / "ep_head.pth"
    raw = torch.load(file, map_location="cpu", weights_only=True)  # plain tensors and values: no allow-list needed
    assert set(raw) == {"state_dict", "meta"}
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert config == raw["meta"] and config["method"] == "MAE" and config["head_epoch"] == 12
    if name in ("ep", "ep_all"):
        m = options["num_queries"]
        assert set(raw["state_dict"]) == {
            "0.cls_token",
            "0.v.weight",
            "1.running_mean",
            "1.running_var",
            "1.num_batches_tracked",
            "2.weight",
            "2.bias",
        }
        assert raw["state_dict"]["0.cls_token"].shape == (1, m, D)
        assert raw["state_dict"]["0.v.weight"].shape == (D // options.get("d_out", 1), D)
        assert config["cls_features"] == name and config["ep_queries"] == m and config["d_out"] == options.get("d_out", 1)
    else:
        assert set(raw["state_dict"]) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias"}
        assert config["cls_features"] == {"cls": "cls", "gap": "pos"}[name]

    loaded = load_reference_head(tmp_path / "release")
    assert {k: v for k, v in loaded.config.items() if k != "source"} == probe.config
    for seed in range(3):
        patch, prefix = tokens(batch=4, num_prefix=2, seed=seed)
        torch.testing.assert_close(loaded(patch, prefix), probe(patch, prefix), atol=1e-6, rtol=0)


def test_saved_release_keeps_the_release_meta_and_corrects_d_out(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C, num_queries=4, d_out=2)
    write_reference_release(tmp_path / "dino", state, method="DINO", arch="ViT-B/16", cls_features="ep_all")
    probe = load_reference_head(tmp_path / "dino")
    source = probe.config["source"]
    assert source["layout"] == "release" and source["epoch"] == 86 and source["val_acc1"] == 75.41
    assert source["meta"]["method"] == "DINO" and source["file"] == str((tmp_path / "dino" / "ep_head.pth").resolve())
    out = save_reference_head(probe, tmp_path / "again" / "head.pth", meta={"head_epoch": 90})
    meta = json.loads((tmp_path / "again" / "config.json").read_text())
    assert out.name == "head.pth" and meta["method"] == "DINO" and meta["arch"] == "ViT-B/16"
    assert meta["head_epoch"] == 90 and meta["d_out"] == 2 and meta["cls_features"] == "ep_all"


# --- training checkpoints ------------------------------------------------------------------------


def test_training_checkpoint_with_args_and_optimizer_state_loads(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C, num_queries=8, seed=3)
    run = tmp_path / "linprobe_mae_ep_q8"
    write_reference_checkpoint(run / "checkpoint-best.pth", state, cls_features="ep", epoch=41, val_acc1=71.25)
    probe = load_reference_head(run)  # the run's folder: checkpoint-best.pth is found
    assert probe.name == "ep" and probe.num_queries == 8 and probe.d_out == 1 and probe.num_classes == C
    patch, cls = tokens(seed=5)
    torch.testing.assert_close(probe(patch, cls), reference_logits(state, patch, cls, "ep"), atol=1e-5, rtol=1e-5)
    source = probe.config["source"]
    assert source["layout"] == "training checkpoint" and source["epoch"] == 41 and source["val_acc1"] == 71.25
    assert source["args"]["model"] == "vit_base_patch16" and source["args"]["ep_queries"] == 8
    assert "data_path" not in source["args"] and "output_dir" not in source["args"] and "finetune" not in source["args"]
    assert "/scratch/" not in json.dumps(source)
    assert int(probe.norm.num_batches_tracked) == 1234


@pytest.mark.parametrize(
    ("cls_features", "extra", "expected"),
    [("ep_all", {"timm": True}, ("ep_all", "mean")), ("cls", {}, ("cls", "first")), ("pos", {}, ("gap", None))],
)
def test_training_checkpoint_method_comes_from_args(tmp_path, cls_features, extra, expected):
    kind = "ep" if cls_features.startswith("ep") else "lp"
    state = reference_head_state(kind, dim=D, num_classes=C)
    file = write_reference_checkpoint(tmp_path / "checkpoint.pth", state, cls_features=cls_features, **extra)
    probe = load_reference_head(file)
    assert (probe.name, getattr(probe, "prefix", None)) == expected
    assert probe.config["source"]["cls_features"] == cls_features


def test_checkpoint_of_the_whole_model_reads_its_head(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C)
    file = write_reference_checkpoint(tmp_path / "checkpoint-best.pth", state, saved_module="full")
    probe = load_reference_head(file)
    torch.testing.assert_close(probe.queries, state["0.cls_token"][0])


def test_bare_state_dict_defaults_to_ep_and_cls(tmp_path):
    torch.save(reference_head_state("ep", dim=D, num_classes=C), tmp_path / "ep.pth")
    torch.save(reference_head_state("lp", dim=D, num_classes=C), tmp_path / "lp.pth")
    assert load_reference_head(tmp_path / "ep.pth").name == "ep"
    assert load_reference_head(tmp_path / "lp.pth").name == "cls"
    assert load_reference_head(tmp_path / "lp.pth", config={"cls_features": "pos"}).name == "gap"


# --- what is refused ---------------------------------------------------------------------------


def test_checkpoint_needing_other_objects_is_refused_naming_them(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C)
    file = write_reference_checkpoint(tmp_path / "checkpoint-best.pth", state, loss=Stranger())
    with pytest.raises(WeightsError, match=r"tests\.training\.test_reference\.Stranger") as err:
        load_reference_head(file)
    assert "argparse.Namespace" not in str(err.value).split("needs")[1]


def test_refusals(tmp_path):
    ep = reference_head_state("ep", dim=D, num_classes=C)
    torch.save({"0.attn.weight": torch.ones(3, D), "1.running_mean": torch.zeros(D)}, tmp_path / "simpool.pth")
    with pytest.raises(WeightsError, match="neither EP"):
        load_reference_head(tmp_path / "simpool.pth")
    write_reference_checkpoint(tmp_path / "a" / "checkpoint.pth", ep, ep_queries=32)
    with pytest.raises(WeightsError, match="ep_queries=32 .the tensors say 4"):
        load_reference_head(tmp_path / "a")
    write_reference_checkpoint(tmp_path / "b" / "checkpoint.pth", ep, cls_features="simpool")
    with pytest.raises(WeightsError, match="'simpool'"):
        load_reference_head(tmp_path / "b")
    with pytest.raises(WeightsError, match="holds an EP head"):
        load_reference_head(tmp_path / "b", config={"cls_features": "cls"})
    torch.save({**ep, "2.weight": torch.ones(C, D + 1)}, tmp_path / "damaged.pth")
    with pytest.raises(WeightsError, match="do not fit together"):
        load_reference_head(tmp_path / "damaged.pth")
    torch.save({**ep, "0.v.bias": torch.zeros(D)}, tmp_path / "bias.pth")
    with pytest.raises(WeightsError, match="bias"):
        load_reference_head(tmp_path / "bias.pth")
    nan = dict(ep)
    nan["2.bias"] = torch.full((C,), float("nan"))
    torch.save(nan, tmp_path / "nan.pth")
    with pytest.raises(WeightsError, match="NaN"):
        load_reference_head(tmp_path / "nan.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read .* not a torch checkpoint") as err:
        load_reference_head(tmp_path / "text.pth")
    assert "pickled objects" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="ep_head.pth"):
        load_reference_head(tmp_path / "empty")


def test_save_reference_head_refusals(tmp_path):
    with pytest.raises(ConfigError, match="no counterpart"):
        save_reference_head(probes.build("mhca", D, C), tmp_path)
    with pytest.raises(TypeError, match=r"meta\['when'\] is a Tensor"):
        save_reference_head(probes.build("cls", D, C), tmp_path, meta={"when": torch.ones(1)})
    with pytest.raises(ConfigError, match="ep_queries=32"):
        save_reference_head(probes.build("ep", D, C, num_queries=4), tmp_path, meta={"ep_queries": 32})
    assert not list(tmp_path.iterdir())


# --- saved probes: model card, records ---------------------------------------------------------


def token_set(n: int, seed: int) -> TokenSet:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    patch = rng.normal(size=(n, 4, D)).astype(np.float32)
    patch[np.arange(n), 0, labels] += 4.0
    origin = TokenOrigin(backbone="tiny-mae", layer=5, dataset="toy", cache="tiny-mae-0123abcd", split="train")
    return TokenSet(patch, rng.normal(size=(n, 1, D)).astype(np.float32), labels, (2, 2), num_classes=C, origin=origin)


def test_model_card_of_a_fit_and_of_a_tuned_run(tmp_path):
    train, val = token_set(64, 0), token_set(32, 1)
    options = dict(epochs=3, batch_size=16, optimizer="adamw", warmup_epochs=1, progress=False)
    result = fit(probes.build("ep", D, C, num_queries=4, seed=0), train, val, lr=1e-2, **options)
    base = result.save(tmp_path / "ep")
    card = read_model_card(base)
    assert card == json.loads((tmp_path / "ep.json").read_text())["card"]
    assert card["probe"] == "ep" and card["backbone"] == "tiny-mae" and card["layer"] == 5
    assert card["token_cache"] == "tiny-mae-0123abcd" and card["train_size"] == 64 and card["val_size"] == 32
    assert card["protocol"] == result.config["protocol"] and card["fit"]["lr"] == 1e-2 and card["fit"]["epochs"] == 3
    assert card["fit"]["torch_threads"] == torch.get_num_threads() and card["fit"]["device"] == result.config["device"]
    assert card["selected_epoch"] == result.best_epoch and card["val_acc"] == pytest.approx(result.best_acc)
    assert card["test_acc"] is None and card["tuned"] is None and card["source"] is None

    save_probe(result.probe, tmp_path / "with-test", {"fit": result.config, "best_epoch": 2}, card={"test_acc": 0.75})
    card = read_model_card(tmp_path / "with-test")
    assert card["test_acc"] == 0.75 and card["selected_epoch"] == 2

    grid = {"lrs": (1e-3, 1e-2), "weight_decays": (0.0,)}
    tuned = tune(probes.build("ep", D, C, num_queries=4, seed=0), train, val, grid=grid, **options)
    tuned.save(tmp_path / "tuned")
    card = read_model_card(tmp_path / "tuned.json")
    assert card["tuned"]["lr"] == tuned.config["lr"] and card["tuned"]["lr"] in (1e-3, 1e-2)
    assert card["tuned"]["lrs"] == [1e-3, 1e-2] and card["fit"]["lr"] == tuned.config["lr"]


def test_files_without_a_card_still_load_and_get_one(tmp_path):
    probe = random_probe("ep", num_queries=4)
    save_probe(probe, tmp_path / "old", {"best_epoch": 7, "best_acc": 0.5})
    doc = json.loads((tmp_path / "old.json").read_text())
    card = doc.pop("card")
    (tmp_path / "old.json").write_text(json.dumps(doc))  # as written before the card existed
    loaded = load_probe(tmp_path / "old")
    patch, prefix = tokens()
    torch.testing.assert_close(loaded(patch, prefix), probe(patch, prefix))
    assert read_model_card(tmp_path / "old") == card and card["selected_epoch"] == 7 and card["val_acc"] == 0.5


def test_a_reference_head_saved_by_epviz_keeps_its_source(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C)
    probe = load_reference_head(write_reference_release(tmp_path / "release", state, cls_features="ep_all"))
    save_probe(probe, tmp_path / "epviz" / "head")
    again = load_probe(tmp_path / "epviz" / "head")
    assert again.config == probe.config and again.config["source"]["meta"]["method"] == "MAE"
    assert read_model_card(tmp_path / "epviz" / "head")["source"] == probe.config["source"]
    patch, prefix = tokens()
    torch.testing.assert_close(again(patch, prefix), probe(patch, prefix))


def test_fixture_checkpoint_holds_what_the_reference_writes(tmp_path):
    """The fixture is a faithful checkpoint: a Namespace with Path values, the optimizer and scaler states."""
    state = reference_head_state("ep", dim=D, num_classes=C)
    file = write_reference_checkpoint(tmp_path / "checkpoint-best.pth", state)
    with pytest.raises(Exception, match="Namespace|PosixPath"):
        torch.load(file, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace, type(Path("/"))]):
        raw = torch.load(file, map_location="cpu", weights_only=True)
    assert set(raw) == {"saved_module", "model", "optimizer", "epoch", "scaler", "args", "test_stats"}
    assert isinstance(raw["args"].data_path, Path) and raw["optimizer"]["state"][0]["mu"].shape == (1, 4, D)


# --- hostile files: sizes, numbers and failures are checked before anything is built --------------


def test_an_expanded_head_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """A 4.5 kB file of stride-0 tensors declaring 10**7 classes: refused from its strides, nothing allocated."""
    import epviz.training.reference as reference

    state = reference_head_state("ep", dim=D, num_classes=C)
    state["2.weight"] = torch.zeros(1, 1).expand(10**7, D)  # pickles as one float, materialises 640 MB
    state["2.bias"] = torch.zeros(1).expand(10**7)
    file = write_reference_release(tmp_path / "huge", state)
    assert file.stat().st_size < 10_000

    def no_build(*args, **kwargs):
        raise AssertionError("a probe was built for a file that declares what it does not hold")

    monkeypatch.setattr(reference, "build", no_build)
    with pytest.raises(WeightsError, match=r"huge/ep_head.pth: tensor '2.weight' of shape \(10000000, 16\) is an expansion"):
        load_reference_head(file)


def test_a_negative_batchnorm_variance_is_refused_at_load(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C)
    state["1.running_var"][3] = -0.25  # loaded, it would make every logit NaN
    file = write_reference_release(tmp_path / "negative", state)
    with pytest.raises(
        WeightsError, match=r"ep_head.pth: tensor '1.running_var' is a BatchNorm running variance with 1 negative"
    ):
        load_reference_head(file)


def test_metadata_numbers_are_parsed_strictly_and_checked_against_the_tensors(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C, num_queries=4, d_out=2)
    folder = tmp_path / "release"
    write_reference_release(folder, state)
    config = folder / "config.json"
    meta = json.loads(config.read_text())

    def with_config(**entries):
        config.write_text(json.dumps({**meta, **entries}))

    with_config(num_classes="5")  # a string skipped the check before
    with pytest.raises(ConfigError, match=r"release/config.json: num_classes must be an integer in \[1, 100000\], got '5'"):
        load_reference_head(folder)
    with_config(ep_queries=True)
    with pytest.raises(ConfigError, match=r"config.json: ep_queries must be an integer in \[1, 100000\], got True"):
        load_reference_head(folder)
    with_config(num_classes=7)
    with pytest.raises(ConfigError, match="config.json: num_classes is 7, but the tensors of ep_head.pth say 5. Fix or remove"):
        load_reference_head(folder)
    with_config(head_epoch=12)  # the checkpoint's own meta says 86
    with pytest.raises(ConfigError, match=r"config.json: head_epoch is 12, but .*ep_head.pth \(its meta\) says 86"):
        load_reference_head(folder)
    config.write_text("[" * 50_000 + "]" * 50_000)  # a RecursionError before
    with pytest.raises(ConfigError, match="config.json nests lists and objects more than 64 deep"):
        load_reference_head(folder)
    with_config()
    with pytest.raises(ConfigError, match="the config= argument: ep_queries is 8, but the tensors of ep_head.pth say 4. Drop"):
        load_reference_head(folder, config={"ep_queries": 8})
    with pytest.raises(ConfigError, match="the config= argument: d_out is 1, but the tensors of ep_head.pth say 2"):
        load_reference_head(folder, config={"d_out": 1})
    (tmp_path / "given.json").write_text(json.dumps({"nb_classes": 5.5}))
    with pytest.raises(ConfigError, match=r"given.json: nb_classes must be an integer in \[1, 100000\], got 5.5"):
        load_reference_head(folder, config=tmp_path / "given.json")
    # the exporter writes d_out 1 for every head: that value is the exporter's, recorded as the tensors' d_out
    probe = load_reference_head(folder, config={"num_classes": 5.0, "head_epoch": 90})
    assert probe.d_out == 2 and probe.config["source"]["meta"]["d_out"] == 2
    assert probe.config["source"]["meta"]["num_classes"] == 5 and probe.config["source"]["epoch"] == 90


def test_run_arguments_are_parsed_strictly(tmp_path):
    state = reference_head_state("ep", dim=D, num_classes=C)
    file = write_reference_checkpoint(tmp_path / "checkpoint.pth", state, nb_classes="5")
    with pytest.raises(WeightsError, match=r"checkpoint.pth: its args: nb_classes must be an integer in \[1, 100000\], got '5'"):
        load_reference_head(file)


def test_torch_failures_while_loading_become_weights_errors_naming_the_file(tmp_path, monkeypatch):
    import epviz.training.checkpoints as checkpoints
    import epviz.training.reference as reference

    file = write_reference_release(tmp_path / "head", reference_head_state("ep", dim=D, num_classes=C))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(reference, "build", out_of_memory)
    with pytest.raises(WeightsError, match=r"head/ep_head.pth: torch failed while building .*RuntimeError: CUDA out of memory"):
        load_reference_head(file)

    base = save_probe(random_probe("ep", num_queries=4), tmp_path / "saved")
    real = checkpoints.build

    def only_on_meta(*args, **kwargs):  # the shape check builds on the meta device; the real build runs out of memory
        if torch.empty(0).device.type != "meta":
            raise MemoryError
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "build", only_on_meta)
    with pytest.raises(WeightsError, match=r"saved.json: torch failed while building .*MemoryError"):
        load_probe(base)


def test_a_saved_probe_declaring_huge_sizes_is_refused_before_it_is_built(tmp_path, monkeypatch):
    import epviz.training.checkpoints as checkpoints

    real = checkpoints.build

    def only_on_meta(*args, **kwargs):
        assert torch.empty(0).device.type == "meta", "a probe was allocated from what its JSON declares"
        return real(*args, **kwargs)

    base = save_probe(probes.build("gap", D, C), tmp_path / "probe")
    doc = json.loads((tmp_path / "probe.json").read_text())
    monkeypatch.setattr(checkpoints, "build", only_on_meta)

    def with_probe(**entries):
        (tmp_path / "probe.json").write_text(json.dumps({**doc, "probe": {**doc["probe"], **entries}}))

    with_probe(num_classes=10**9)
    with pytest.raises(
        WeightsError, match=r"probe.json: probe field 'num_classes' must be an integer in \[1, 100000\], got 1000000000"
    ):
        load_probe(base)
    with_probe(num_classes=99_999, dim=99_999)  # each in bounds: 10**10 values together
    with pytest.raises(WeightsError, match=r"probe.json describes a 'gap' probe .* of 10,000,099,999 values, more than"):
        load_probe(base)
    with_probe(num_classes=7)  # the stored tensors say 5
    with pytest.raises(WeightsError, match=r"probe.safetensors does not fit the probe its JSON describes .*num_classes=7"):
        load_probe(base)
    with_probe(num_classes="5")
    with pytest.raises(WeightsError, match=r"probe.json: probe field 'num_classes' must be an integer in \[1, 100000\], got '5'"):
        load_probe(base)
    (tmp_path / "probe.json").write_text('{"format": "epviz-probe/1", "probe": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(WeightsError, match="probe.json nests lists and objects more than 64 deep"):
        load_probe(base)


def test_a_saved_probe_reads_its_options_as_the_json_states_them(tmp_path):
    probe = random_probe("ep", num_queries=4)
    base = save_probe(probe, tmp_path / "ep")
    doc = json.loads((tmp_path / "ep.json").read_text())
    for value, read in (("4", "4"), (True, "1"), (4.5, "4")):
        (tmp_path / "ep.json").write_text(json.dumps({**doc, "probe": {**doc["probe"], "num_queries": value}}))
        with pytest.raises(WeightsError, match=f"ep.json: probe field 'num_queries' is .*, which the 'ep' probe reads as {read}"):
            load_probe(base)
    (tmp_path / "ep.json").write_text(json.dumps({**doc, "probe": {**doc["probe"], "num_queries": 4.0}}))
    patch, prefix = tokens()
    torch.testing.assert_close(load_probe(base)(patch, prefix), probe(patch, prefix))


def test_a_saved_probe_whose_weights_changed_after_saving_is_refused(tmp_path):
    probe = random_probe("cls")
    base = save_probe(probe, tmp_path / "lp")
    weights = tmp_path / "lp.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01  # a low bit of a stored float: still finite, silently another weight
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"lp.safetensors has sha256 .*, but lp.json records .*: the weights were changed"):
        load_probe(base)
