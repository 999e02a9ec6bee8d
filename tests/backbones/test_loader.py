import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from epviz.backbones import BackboneError, HubUnavailable, load_backbone, loader, zoo
from epviz.errors import ConfigError, WeightsError

PRESENT = list(zoo.available())
TRAINED = [n for n in PRESENT if zoo.ENTRIES[n].file]


@pytest.mark.parametrize("name", PRESENT)
def test_zoo_backbones_load_offline(name):
    bb = load_backbone(name, device="cpu")
    assert (bb.num_prefix_tokens, bb.grid, bb.dim, bb.depth, bb.image_size) == (1, (8, 8), 192, 6, (64, 64))
    assert not any(p.requires_grad for p in bb.model.parameters())
    out = bb.model.forward_intermediates(
        torch.zeros(2, 3, 64, 64), indices=[5], intermediates_only=True, output_fmt="NLC", return_prefix_tokens=True
    )
    assert out[0][0].shape == (2, 64, 192) and out[0][1].shape == (2, 1, 192)


@pytest.mark.parametrize("name", TRAINED)
def test_zoo_cards_match_their_weights(name):
    card = zoo.zoo_card(name)
    assert card["sha256"] == zoo.file_sha256(zoo.zoo_weights(name))
    for field in ("objective", "data", "training", "wall_time_seconds", "final_metrics", "architecture"):
        assert field in card, f"model card of {name} lacks {field}"
    assert load_backbone(name).weights_id == card["sha256"]


def test_trained_zoo_weights_differ_from_random():
    rand = load_backbone("tiny-random").model.state_dict()
    for name in TRAINED:
        trained = load_backbone(name).model.state_dict()
        assert not torch.equal(trained["blocks.0.attn.qkv.weight"], rand["blocks.0.attn.qkv.weight"])


def test_tiny_random_is_seeded():
    a, b = load_backbone("tiny-random"), load_backbone("tiny-random")
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())


def test_corrupt_zoo_file_is_detected(monkeypatch, tmp_path):
    name = TRAINED[0]
    bad = tmp_path / f"{name}.safetensors"
    bad.write_bytes(zoo.zoo_weights(name).read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(zoo, "zoo_weights", lambda n: tmp_path / f"{n}.safetensors")
    with pytest.raises(BackboneError, match="sha256"):
        load_backbone(name)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_timm_vit_from_local_file(tmp_path, suffix, reg_tokens):
    source = timm.create_model("test_vit", pretrained=False, num_classes=0, reg_tokens=reg_tokens)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    bb = load_backbone("test_vit", weights=path, reg_tokens=reg_tokens)
    assert bb.num_prefix_tokens == 1 + reg_tokens and bb.grid == (10, 10) and bb.dim == 64 and bb.depth == 6
    assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in state.items())
    assert bb.mean == (0.5, 0.5, 0.5)


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    path = tmp_path / "evil.pth"
    torch.save({"model": argparse.Namespace(payload=1)}, path)  # an arbitrary object: unpickling it is refused
    with pytest.raises(BackboneError, match="weights_only|cannot read"):
        load_backbone("test_vit", weights=path)


def test_wrong_architecture_for_weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit2", num_classes=0).state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="does not fit"):
        load_backbone("test_vit", weights=path)


def test_missing_and_truncated_weights_files(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("test_vit", weights=tmp_path / "absent.safetensors")
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(BackboneError, match="cannot read"):
        load_backbone("test_vit", weights=bad)
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    with pytest.raises(BackboneError, match="neither a safetensors file nor a torch checkpoint") as err:
        load_backbone("test_vit", weights=text)
    assert "pickled" not in str(err.value)


def test_offline_hub_error_is_fast_and_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("EPVIZ_HUB_HOST", "hub.invalid")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(HubUnavailable) as err:
        load_backbone("vit_base_patch16_224.mae")
    # a guard against hub retry loops (about a minute), not a benchmark
    assert time.perf_counter() - start < 10
    assert "weights=" in str(err.value) and "not in the local cache" in str(err.value)


def test_hf_hub_offline_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="HF_HUB_OFFLINE"):
        load_backbone("vit_small_patch16_224.dino")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(BackboneError, match="vit_base_patch16_224"):
        load_backbone("vit_bse_patch16_224")
    with pytest.raises(BackboneError, match="tiny-mae"):
        load_backbone("tiny-mea")


def test_layer_indices(test_vit_backbone):
    bb = test_vit_backbone
    assert bb.resolve_layers(0) == [0]
    assert bb.resolve_layers([-1, 2]) == [5, 2]
    assert bb.resolve_layers(None) == list(range(6))
    for bad in (6, -7):
        with pytest.raises(ValueError, match="out of range"):
            bb.resolve_layers(bad)
    with pytest.raises(ValueError, match="integers"):
        bb.resolve_layers([1.0])


def test_present_backbones_leaves_out_zoo_models_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(loader.zoo, "zoo_weights", lambda name: tmp_path / f"{name}.safetensors")
    (tmp_path / "tiny-sup.safetensors").write_bytes(b"")
    (tmp_path / "tiny-sup.json").write_text("{}")
    (tmp_path / "tiny-mae.safetensors").write_bytes(b"")  # weights without a model card are not loadable
    with pytest.warns(UserWarning, match="tiny-mae"):
        kept = loader.present_backbones(["tiny-mae", "tiny-sup", "tiny-random", "vit_small_patch16_224"])
    assert kept == ["tiny-sup", "tiny-random", "vit_small_patch16_224"]


# --- bad weights files: one clear error each -----------------------------------------------


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def test_checkpoint_with_training_arguments_names_the_global_and_the_conversion(tmp_path):
    import argparse

    path = tmp_path / "mae_release.pth"
    source = timm.create_model("test_vit", pretrained=False, num_classes=0)
    torch.save({"model": _state(source), "args": argparse.Namespace(lr=1.5e-4, model="test_vit")}, path)
    with pytest.raises(BackboneError) as err:
        load_backbone("test_vit", weights=path)
    text = str(err.value)
    assert "\x1b" not in text, "terminal colour codes are stripped"
    assert "argparse.Namespace" in text and str(path) in text
    assert "safe_globals([argparse.Namespace])" in text and "save_file" in text and "mae_release.safetensors" in text
    assert isinstance(err.value, WeightsError)


def test_converted_checkpoint_loads(tmp_path):
    """The conversion the message shows gives a file epviz loads."""
    import argparse

    path = tmp_path / "release.pth"
    source = timm.create_model("test_vit", pretrained=False, num_classes=0)
    torch.save({"model": _state(source), "args": argparse.Namespace(lr=1.0)}, path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in ckpt["model"].items()}, str(tmp_path / "release.safetensors"))
    bb = load_backbone("test_vit", weights=tmp_path / "release.safetensors")
    assert torch.equal(bb.model.state_dict()["pos_embed"], source.state_dict()["pos_embed"])


def test_unpickling_is_never_the_fallback(tmp_path, monkeypatch):
    import argparse

    path = tmp_path / "w.pth"
    torch.save({"model": _state(timm.create_model("test_vit", num_classes=0)), "args": argparse.Namespace(a=1)}, path)
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(BackboneError):
        load_backbone("test_vit", weights=path)
    assert calls and all(flag is True for flag in calls)


def test_width_and_patch_mismatch_is_named_on_the_first_line(tmp_path):
    path = tmp_path / "w96.safetensors"
    save_file(_state(timm.create_model("test_vit", num_classes=0, embed_dim=96)), str(path))
    with pytest.raises(BackboneError) as err:
        load_backbone("test_vit", weights=path, patch_size=8)
    first, *rest = str(err.value).splitlines()
    assert "checkpoint has width 96 and patch 16; the model expects width 64 and patch 8" in first
    assert str(path) in first
    assert "patch_embed.proj.weight (96, 3, 16, 16) vs (64, 3, 8, 8)" in "\n".join(rest)
    assert len(str(err.value).splitlines()) < 10


def test_input_size_mismatch_is_not_resampled(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_state(timm.create_model("test_vit", num_classes=0)), str(path))  # 160 px, 10x10 grid
    with pytest.raises(
        BackboneError, match=r"position embeddings for 101 tokens; the model expects position embeddings for 197.*img_size=160"
    ):
        load_backbone("test_vit", weights=path, img_size=224)


def test_depth_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_state(timm.create_model("test_vit", num_classes=0)), str(path))
    with pytest.raises(BackboneError) as err:
        load_backbone("test_vit2", weights=path)
    text = str(err.value)
    assert text.splitlines()[0].endswith("checkpoint has 6 blocks; the model expects 8 blocks")
    assert "missing keys: reg_token" in text and "unexpected keys: cls_token" in text


def test_nan_weights_are_refused_at_load_time(tmp_path):
    state = _state(timm.create_model("test_vit", num_classes=0))
    state["blocks.2.mlp.fc1.weight"][0, :5] = float("nan")
    state["norm.weight"][0] = float("inf")
    path = tmp_path / "diverged.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        BackboneError,
        match=r"diverged.safetensors: tensor 'blocks.2.mlp.fc1.weight' holds 5 NaN or inf values .*2 tensors hold 6",
    ):
        load_backbone("test_vit", weights=path)


def test_layer_and_name_arguments_raise_config_errors(test_vit_backbone):
    for bad in (6, -7, [1.5], [], [0, -6], "last"):
        with pytest.raises(ConfigError):
            test_vit_backbone.resolve_layers(bad)
    assert test_vit_backbone.resolve_layers(np.int64(2)) == [2]
    with pytest.raises(ConfigError, match="name must be a backbone name"):
        load_backbone(None)


# --- hostile files: what a file declares is checked before it is trusted --------------------------


def test_expanded_tensors_are_refused_before_their_values_are_read(tmp_path):
    state = _state(timm.create_model("test_vit", num_classes=0))
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(1, 1).expand(*state["blocks.0.mlp.fc1.weight"].shape)
    path = tmp_path / "expanded.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"expanded.pth: tensor 'blocks.0.mlp.fc1.weight' of shape .* is an expansion"):
        load_backbone("test_vit", weights=path)


def test_compressed_checkpoints_are_refused_before_they_are_inflated(tmp_path):
    import zipfile

    state = {**_state(timm.create_model("test_vit", num_classes=0)), "pad": torch.zeros(10**7)}  # 40 MB that deflate to 40 kB
    torch.save(state, tmp_path / "plain.pth")
    with (
        zipfile.ZipFile(tmp_path / "plain.pth") as src,
        zipfile.ZipFile(tmp_path / "zipped.pth", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(BackboneError, match=r"zipped.pth declares [\d,]+ bytes of records in a file of"):
        load_backbone("test_vit", weights=tmp_path / "zipped.pth")


def test_torch_failures_while_loading_become_backbone_errors_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file(_state(timm.create_model("test_vit", num_classes=0)), str(path))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(loader.timm, "create_model", out_of_memory)
    with pytest.raises(BackboneError, match=r"w.safetensors: torch failed while building test_vit .*can't allocate memory"):
        load_backbone("test_vit", weights=path)


def test_pixel_control_tokens_are_the_normalised_pixels():
    bb = load_backbone("tiny-pixels")
    images = torch.rand(3, 3, 64, 64)
    x = (images - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    for layer in (0, 5):
        ((patch, prefix),) = bb.model.forward_intermediates(
            x, indices=[layer], intermediates_only=True, output_fmt="NLC", return_prefix_tokens=True
        )
        pixels = x.reshape(3, 3, 8, 8, 8, 8).permute(0, 2, 4, 3, 5, 1).reshape(3, 64, 192)  # (row, col, channel) per patch
        torch.testing.assert_close(patch, pixels, rtol=0, atol=1e-6)
        torch.testing.assert_close(prefix[:, 0], pixels.mean(1), rtol=0, atol=1e-6)


def test_first_checkpoint_of_the_mae_run_is_tiny_random():
    start, rand = load_backbone("tiny-mae@0"), load_backbone("tiny-random")
    assert start.weights_id == rand.weights_id
    assert all(torch.equal(v, rand.model.state_dict()[k]) for k, v in start.model.state_dict().items())


def test_untrained_axis_entries_are_left_out_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(loader.zoo, "zoo_weights", lambda name: tmp_path / f"{name}.safetensors")
    with pytest.warns(UserWarning, match="tiny-ssl is left out"):
        assert loader.present_backbones(["tiny-ssl", "tiny-pixels", "tiny-mae@0"]) == ["tiny-pixels", "tiny-mae@0"]
    with pytest.raises(BackboneError, match="tiny-ssl.*missing.*train_zoo"):
        load_backbone("tiny-ssl")


def test_every_entry_has_facts_for_the_tables():
    from epviz.results import backbone_facts

    for name, entry in zoo.ENTRIES.items():
        facts = backbone_facts(name)
        assert (facts["family"], facts["method"]) == (entry.family, entry.method)
        assert facts["pretrain"] == ("none" if entry.epochs == 0 else "cluttered Fashion-MNIST")
