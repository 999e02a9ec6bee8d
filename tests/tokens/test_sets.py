"""Tokens of several backbones and splits: every block extracted once."""

import pytest

from epviz.tokens import extract_sets, layer_tokens


def test_zoo_caches_extract_every_block_once(tmp_path, monkeypatch, small_canvases, test_vit_backbone):
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path))
    sets = {"train": small_canvases}
    caches = extract_sets([test_vit_backbone], sets)
    cache = caches["test_vit"]["train"]
    assert not cache.hit and cache.layers == list(range(test_vit_backbone.depth))
    tokens = layer_tokens(caches, 2)
    ts = tokens["test_vit"]["train"]
    assert ts.origin.layer == 2 and len(ts) == len(small_canvases) and ts.dim == test_vit_backbone.dim
    last = layer_tokens(extract_sets([test_vit_backbone], sets), -1)["test_vit"]["train"]
    assert last.origin.layer == test_vit_backbone.depth - 1
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1, "every layer and call shares one cache"
    with pytest.raises(ValueError, match="no datasets"):
        extract_sets([test_vit_backbone], {})
