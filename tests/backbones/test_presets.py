import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN

import epviz
from epviz.backbones import BackboneError, presets

# (prefix tokens, grid, width, depth) of every preset at 224 px
EXPECTED = {
    "mae-vit-s": (1, 14, 384, 12),
    "mae-vit-b": (1, 14, 768, 12),
    "mae-vit-l": (1, 14, 1024, 24),
    "mae-vit-h": (1, 16, 1280, 32),
    "beitv2-vit-b": (1, 14, 768, 12),
    "dino-vit-s": (1, 14, 384, 12),
    "dino-vit-b": (1, 14, 768, 12),
    "dinov2-vit-s": (1, 16, 384, 12),
    "dinov2-vit-b": (1, 16, 768, 12),
    "dinov2-vit-l": (1, 16, 1024, 24),
    "dinov2-vit-b-reg": (5, 16, 768, 12),
    "dinov2-vit-l-reg": (5, 16, 1024, 24),
    "clip-vit-b": (1, 14, 768, 12),
    "clip-vit-l": (1, 16, 1024, 24),
    "eva02-vit-b": (1, 16, 768, 12),
    "eva02-vit-l": (1, 16, 1024, 24),
    "siglip-vit-b": (0, 14, 768, 12),
    "siglip-vit-l": (0, 14, 1024, 24),
}


def test_every_preset_is_listed_and_maps_to_a_timm_model_with_a_pretrained_config():
    assert set(presets.available_presets()) == set(EXPECTED)
    for preset in presets.PRESETS.values():
        assert timm.is_model(preset.architecture), preset.name
        if not preset.weights_required:
            assert preset.timm_name in timm.list_pretrained(preset.timm_name), preset.name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_architecture_built_without_weights(name):
    arch = presets.preset_architecture(name)  # meta device: no weights allocated, nothing downloaded
    prefix, grid, dim, depth = EXPECTED[name]
    assert (arch["num_prefix_tokens"], arch["grid"], arch["dim"], arch["depth"]) == (prefix, (grid, grid), dim, depth)
    assert arch["image_size"] == (224, 224) and arch["forward_intermediates"]


def test_normalisation_comes_from_the_pretrained_config():
    assert presets.PRESETS["mae-vit-b"].mean == IMAGENET_DEFAULT_MEAN
    assert presets.PRESETS["clip-vit-b"].mean == pytest.approx(OPENAI_CLIP_MEAN)
    assert presets.PRESETS["eva02-vit-b"].mean == pytest.approx(OPENAI_CLIP_MEAN)
    assert presets.PRESETS["siglip-vit-b"].mean == (0.5, 0.5, 0.5)
    assert presets.PRESETS["mae-vit-s"].mean == IMAGENET_DEFAULT_MEAN, "MAE ViT-S uses MAE's normalisation, not the augreg one"


def test_ep_all_default_for_cls_trained_encoders_only():
    cls_trained = {n for n, p in presets.PRESETS.items() if p.ep_all}
    assert cls_trained == {n for n in EXPECTED if n.split("-")[0] in ("dino", "dinov2", "clip")}
    assert presets.default_probe("dinov2-vit-l-reg") == "ep_all" and presets.default_probe("mae-vit-b") == "ep"
    assert presets.default_probe("vit_base_patch16_224.mae") == "ep"
    assert all(not p.ep_all for n, p in presets.PRESETS.items() if EXPECTED[n][0] == 0), "no [CLS], no ep_all"


def test_load_backbone_resolves_a_preset_to_its_timm_model():
    with pytest.warns(UserWarning, match="random"):
        bb = epviz.load_backbone("mae-vit-s:random", device="cpu")
    assert bb.name == "mae-vit-s:random" and bb.card["timm_name"] == "vit_small_patch16_224"
    assert (bb.num_prefix_tokens, bb.grid, bb.dim, bb.depth) == (1, (14, 14), 384, 12)
    assert bb.mean == IMAGENET_DEFAULT_MEAN
    x = torch.zeros(1, 3, 224, 224)
    assert bb.model.forward_features(x).shape == (1, 197, 384)


def test_pretrained_cfg_and_img_size_pass_through():
    timm_name, pretrained, kwargs, card = presets.resolve("dinov2-vit-b", None, True, {})
    assert (timm_name, pretrained, kwargs) == ("vit_base_patch14_dinov2.lvd142m", True, {"img_size": 224})
    assert card["preset"] == "dinov2-vit-b" and card["ep_all"] is True


def test_clear_errors():
    with pytest.raises(BackboneError, match="weights=PATH"):
        epviz.load_backbone("beitv2-vit-b")
    with pytest.raises(BackboneError, match="tiny-random"):
        epviz.load_backbone("tiny-mae:random")
    with pytest.raises(BackboneError, match="random weights"):
        epviz.load_backbone("mae-vit-b:random", weights="w.safetensors")
    with pytest.raises(KeyError, match="unknown preset"):
        presets.preset_architecture("mae-vit-xxl")


def test_random_timm_name_loads_without_download():
    with pytest.warns(UserWarning, match="weights are random"):
        bb = epviz.load_backbone("test_vit:random", device="cpu")
    assert bb.name == "test_vit:random" and bb.card["random_init"] and bb.grid == (10, 10)


# the reference's final-norm convention per family: its models_vit path (MAE, BEiTv2, DINO) reads the raw
# block output; its DINOv2 wrapper (get_intermediate_layers, norm on) and its timm/open_clip wrappers
# (forward_features) apply the encoder's final norm
FINAL_NORM = {"mae": False, "beitv2": False, "dino": False, "dinov2": True, "clip": True, "eva02": True, "siglip": True}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_carries_the_reference_final_norm(name):
    expected = FINAL_NORM[name.split("-")[0]]
    assert presets.PRESETS[name].final_norm is expected
    assert presets.preset_architecture(name)["final_norm"] is expected  # meta device
    card = presets.resolve(name, None, False, {})[3]
    assert card["final_norm"] is expected
    assert presets.default_norm(name) is expected and presets.default_norm(f"{name}:random") is expected


def test_timm_names_and_zoo_backbones_default_to_no_final_norm():
    for name in ("vit_base_patch14_dinov2.lvd142m", "test_vit", "tiny-mae", "tiny-random", "test_vit:random"):
        assert presets.default_norm(name) is False


def test_eva02_final_norm_is_an_identity_in_timm():
    # timm's EVA02 pools with fc_norm and keeps an identity `norm`: its tokens are the same either way
    with torch.device("meta"):
        model = timm.create_model(presets.PRESETS["eva02-vit-b"].architecture, pretrained=False, num_classes=0)
    assert isinstance(model.norm, torch.nn.Identity)
