import math

import numpy as np
import pytest
import torch

import epviz
from epviz.data import load_split
from epviz.errors import ConfigError, DataError
from epviz.training import PROTOCOL, PROTOCOL_PER_STEP, fit_images
from tests.data.formats import write_imagenet


@pytest.fixture(scope="module")
def imagenet_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root, train_per_class=4, val_per_class=2, size=(48, 40))
    spec = f"imagenet:{root}?resize=80&crop=64"
    return load_split(spec, "train"), load_split(spec, "test")


def test_per_step_protocol_trains_with_lars_schedule_and_best_epoch(test_vit_backbone, imagenet_sets):
    train, test = imagenet_sets
    probe = epviz.probes.build("ep", test_vit_backbone.dim, 3, num_queries=4, seed=0)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    result = fit_images(
        probe, test_vit_backbone, train, test, epochs=3, batch_size=4, warmup_epochs=1, precision="fp32", progress=False, seed=0
    )
    assert result.config["protocol"] == PROTOCOL_PER_STEP != PROTOCOL
    assert result.config["lr"] == pytest.approx(0.1 * 4 / 256), "LARS default lr = 0.1 * batch / 256"
    h = result.history
    assert list(h["epoch"]) == [1, 2, 3] and h["val_acc"].between(0, 1).all()
    assert h["lr"].iloc[0] < h["lr"].max() and h["lr"].iloc[-1] < h["lr"].max(), "warm-up then cosine decay"
    assert result.best_acc == h["val_acc"].max() and h["val_acc"].iloc[result.best_epoch - 1] == result.best_acc
    assert any(not torch.equal(before[k], v) for k, v in probe.state_dict().items()), "the probe was trained"
    assert not any(p.requires_grad for p in test_vit_backbone.model.parameters()), "the backbone stays frozen"
    assert math.isfinite(result.history["train_loss"].iloc[-1])


def test_runs_are_seeded_and_the_seed_changes_the_augmentation(test_vit_backbone, imagenet_sets):
    train, _ = imagenet_sets
    losses = []
    for seed in (0, 0, 1):
        probe = epviz.probes.build("cls", test_vit_backbone.dim, 3, seed=0)
        r = fit_images(
            probe,
            test_vit_backbone,
            train,
            epochs=1,
            batch_size=4,
            warmup_epochs=0,
            optimizer="adamw",
            precision="fp32",
            progress=False,
            seed=seed,
        )
        losses.append(r.history["train_loss"].iloc[0])
        assert math.isnan(r.best_acc) and r.best_epoch == 1
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_bad_inputs_are_refused_clearly(test_vit_backbone, imagenet_sets, small_canvases):
    train, test = imagenet_sets
    with pytest.raises(TypeError, match="with_transform"):
        fit_images(epviz.probes.build("gap", test_vit_backbone.dim, 10), test_vit_backbone, small_canvases)
    with pytest.raises(ValueError, match="D=32"):
        fit_images(epviz.probes.build("gap", 32, 3), test_vit_backbone, train)
    with pytest.raises(ValueError, match="num_classes=2"):
        fit_images(epviz.probes.build("gap", test_vit_backbone.dim, 2), test_vit_backbone, train, test)
    with pytest.raises(ValueError, match="optimizer"):
        fit_images(epviz.probes.build("gap", test_vit_backbone.dim, 3), test_vit_backbone, train, optimizer="rmsprop")


@pytest.mark.parametrize(
    "option, value, names",
    [
        ("lr", -0.5, "lr must be a finite number > 0"),
        ("weight_decay", -1.0, "weight_decay"),
        ("epochs", 0, "epochs"),
        ("batch_size", 0, "batch_size"),
        ("warmup_epochs", 3, r"warmup_epochs=3 is longer than the run \(epochs=2\)"),
        ("scale", (0.0, 1.0), "scale must satisfy 0 < low <= high <= 1"),
        ("scale", (0.9, 0.1), "scale"),
        ("scale", 0.5, "scale must be"),
        ("num_workers", -1, "num_workers"),
        ("layer", 6, r"layer 6 .* out of range"),
    ],
)
def test_options_out_of_range_are_config_errors(test_vit_backbone, imagenet_sets, option, value, names):
    train, _ = imagenet_sets
    options = dict(epochs=2, warmup_epochs=0, progress=False)
    options[option] = value
    with pytest.raises(ConfigError, match=names):
        fit_images(epviz.probes.build("gap", test_vit_backbone.dim, 3), test_vit_backbone, train, **options)


def test_labels_and_classes(test_vit_backbone, imagenet_sets):
    train, test = imagenet_sets
    one = train.subset(np.flatnonzero(np.asarray(train.labels) == 1))
    with pytest.raises(DataError, match=r"single class \(label 1"):
        fit_images(
            epviz.probes.build("gap", test_vit_backbone.dim, 3), test_vit_backbone, one, epochs=1, warmup_epochs=0, progress=False
        )
    with pytest.raises(ConfigError, match=r"labels range from 0 to 2 \(max label 2\) but probe 'gap' has num_classes=2"):
        fit_images(epviz.probes.build("gap", test_vit_backbone.dim, 2), test_vit_backbone, train, test, epochs=1, warmup_epochs=0)
