"""No selection on test: token sets remember their split, and fit / fit_grid refuse quietly to select on test."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

import epviz.probes as probes
from epviz.data import ClutteredFashionMNIST
from epviz.tokens import TokenCache, TokenOrigin, TokenSet, extract_tokens
from epviz.tokens.cache import dataset_split
from epviz.training import fit, fit_grid

D, C = 16, 3


def token_set(n=48, seed=0, split=None) -> TokenSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C
    patch = rng.normal(size=(n, 4, D)).astype(np.float32)
    patch[np.arange(n), 0, labels] += 4.0
    return TokenSet(patch, None, labels, (2, 2), num_classes=C, origin=TokenOrigin(backbone="toy", layer=0, split=split))


def selection_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "test split" in str(w.message)]


def test_fit_warns_when_it_selects_on_test_tokens():
    with pytest.warns(UserWarning, match=r"from a test split.*ClutteredFashionMNIST\(\"train\", size, seed=1\)"):
        fit(
            probes.build("gap", D, C), token_set(seed=0, split="train"), token_set(seed=1, split="test"), epochs=1, progress=False
        )


@pytest.mark.parametrize("split", ["train", "val", None])
def test_fit_is_quiet_with_train_derived_or_unknown_val(split):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(probes.build("gap", D, C), token_set(seed=0, split="train"), token_set(seed=1, split=split), epochs=1, progress=False)
    assert selection_warnings(record) == []


def test_fit_grid_warns_too():
    with pytest.warns(UserWarning, match="from a test split"):
        fit_grid(
            "gap",
            token_set(seed=0, split="train"),
            token_set(seed=1, split="test"),
            lrs=(1e-3,),
            weight_decays=(0.0,),
            epochs=1,
            warmup_epochs=0,
            progress=False,
        )


def test_subsets_keep_the_split():
    assert token_set(split="test").subset(np.arange(5)).origin.split == "test"


def test_dataset_split_of_each_kind():
    assert dataset_split(ClutteredFashionMNIST("test", 4, seed=3)) == "test"
    assert dataset_split(ClutteredFashionMNIST("train", 4, seed=1)) == "train"  # the standard val canvases: train items
    assert dataset_split(SimpleNamespace(name="cub", split="test")) == "test"
    assert dataset_split(SimpleNamespace(name="imagenet", split="val", standard_split="test")) == "test"  # declared by imagenet()
    assert dataset_split(SimpleNamespace(split="all", standard_split="test")) == "test"  # a declared standard split wins
    assert dataset_split(object()) is None


def test_token_caches_record_the_split(tmp_path, test_vit_backbone, small_canvases):
    base = dict(cache_dir=tmp_path, progress=False)
    test = extract_tokens(test_vit_backbone, small_canvases, [5], **base)  # canvases of the test items
    val = extract_tokens(test_vit_backbone, ClutteredFashionMNIST("train", 48, seed=1), [5], **base)
    assert test.tokens(5).origin.split == "test" and val.tokens(5).origin.split == "train"
    assert json.loads((test.path / "meta.json").read_text())["split"] == "test"
    assert TokenCache.open(test.path).tokens(5).origin.split == "test"
    # a cache written before the split was recorded: the dataset of the call fills it in
    meta = json.loads((test.path / "meta.json").read_text())
    del meta["split"]
    (test.path / "meta.json").write_text(json.dumps(meta))
    again = extract_tokens(test_vit_backbone, small_canvases, [5], **base)
    assert again.hit and again.tokens(5).origin.split == "test"
    assert TokenCache.open(test.path).tokens(5).origin.split == "test"  # from the fingerprint's split
    with pytest.warns(UserWarning, match="from a test split"):
        fit(probes.build("gap", 64, 10), val.tokens(5), test.tokens(5), epochs=1, batch_size=8, progress=False)
