"""A token cache is believed only after checks: its manifest, key, grid, headers and rows on every open,
its checksums on demand (verify_cache, `epviz cache verify`); concurrent writers of one cache take turns;
NaN tokens in a cache are refused by the evaluation, and the finiteness answer is remembered."""

import dataclasses
import json
import shutil
import threading
import time

import numpy as np
import pytest

import epviz.probes as probes
from epviz.cli import main
from epviz.data import ClutteredFashionMNIST
from epviz.errors import DataError
from epviz.evaluate import accuracy
from epviz.tokens import TokenCache, extract_tokens
from epviz.tokens.cache import _manifest_digest, verify_cache

BASE = dict(layers=[5], batch_size=16, shard_size=16, progress=False)


def extract(backbone, dataset, cache_dir, **changes):
    return extract_tokens(backbone, dataset, cache_dir=cache_dir, **{**BASE, **changes})


def edit_manifest(folder, change, reseal=False):
    """Change meta.json; `reseal` recomputes its checksum (a consistent manifest that says something else)."""
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    if reseal:
        meta["manifest_blake2b"] = _manifest_digest(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_a_cache_copied_under_another_backbones_key_is_refused(tmp_path, test_vit_backbone, small_canvases):
    mine = extract(test_vit_backbone, small_canvases, tmp_path)
    other_backbone = dataclasses.replace(test_vit_backbone, weights_id="other-weights")
    theirs = extract(other_backbone, small_canvases, tmp_path)
    shutil.rmtree(theirs.path)
    shutil.copytree(mine.path, theirs.path)  # complete, but another backbone's tokens
    with pytest.raises(DataError, match=f"{theirs.path / 'meta.json'} belongs to the cache of key {mine.meta['key'][:20]}"):
        extract(other_backbone, small_canvases, tmp_path)
    with pytest.raises(DataError, match="holds another cache's tokens"):
        TokenCache.open(theirs.path)


def test_a_manifest_of_another_grid_is_never_a_hit(tmp_path, test_vit_backbone, small_canvases):
    cache = extract(test_vit_backbone, small_canvases, tmp_path)
    edit_manifest(cache.path, lambda meta: meta["backbone"].update(grid=[5, 20]))
    with pytest.raises(DataError, match=f"{cache.path / 'meta.json'} does not match its own checksum"):
        TokenCache.open(cache.path)
    with pytest.warns(UserWarning, match="extracting it again"):
        again = extract(test_vit_backbone, small_canvases, tmp_path)
    assert not again.hit and again.grid == (10, 10), "an edited manifest is an unfinished cache: extracted again"
    edit_manifest(again.path, lambda meta: meta["backbone"].update(grid=[5, 20]), reseal=True)
    assert TokenCache.open(again.path).grid == (5, 20), "consistent in itself"
    with pytest.raises(DataError, match=r"records grid \[5, 20\] but \[10, 10\] is asked for"):
        extract(test_vit_backbone, small_canvases, tmp_path)


def test_a_file_of_another_dtype_and_shape_but_the_same_size_is_refused(tmp_path, test_vit_backbone, small_canvases):
    cache = extract(test_vit_backbone, small_canvases, tmp_path)
    path = cache.path / "L005_patch.npy"
    size = path.stat().st_size
    np.save(path, np.zeros((48, 50, 64), np.float32))  # the bytes of (48, 100, 64) float16
    assert path.stat().st_size == size
    with pytest.raises(DataError, match=rf"{path} holds a float32 array of shape \(48, 50, 64\) but this cache needs float16"):
        TokenCache.open(cache.path)
    with pytest.raises(DataError, match=str(path)):
        extract(test_vit_backbone, small_canvases, tmp_path)


def test_the_rows_and_shards_are_checked_with_or_without_a_shards_entry(tmp_path, test_vit_backbone, small_canvases):
    cache = extract(test_vit_backbone, small_canvases, tmp_path)
    edit_manifest(cache.path, lambda meta: meta.pop("shards"))
    with pytest.raises(DataError, match="meta.json does not match its own checksum"):
        TokenCache.open(cache.path)
    edit_manifest(cache.path, lambda meta: None, reseal=True)
    with pytest.raises(DataError, match="lacks or garbles an entry"):
        TokenCache.open(cache.path)
    with pytest.warns(UserWarning, match="extracting it again"):
        cache = extract(test_vit_backbone, small_canvases, tmp_path)  # an unfinished cache: extracted again
    assert not cache.hit

    def forty_images(meta):  # every entry says 40 images; the files hold 48
        meta.update(num_images=40, shards=[[0, 16], [16, 32], [32, 40]])
        for entry in meta["arrays"].values():
            entry["shape"][0] = 40

    edit_manifest(cache.path, forty_images, reseal=True)
    labels = cache.path / "labels.npy"
    with pytest.raises(
        DataError, match=rf"{labels} holds a int64 array of shape \(48,\) but this cache needs int64 of shape \(40,\)"
    ):
        TokenCache.open(cache.path)  # len(cache) never disagrees with the rows


def test_a_damaged_header_or_manifest_names_the_file_and_the_fix(tmp_path, test_vit_backbone, small_canvases):
    cache = extract(test_vit_backbone, small_canvases, tmp_path)
    path = cache.path / "L005_prefix.npy"
    raw = bytearray(path.read_bytes())
    raw[20:40] = b"(((((((((((((((((((("  # tokenize.TokenError inside numpy's header parser
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{path} has a damaged .npy header .*delete {cache.path} and extract again"):
        TokenCache.open(cache.path)
    shutil.rmtree(cache.path)
    cache = extract(test_vit_backbone, small_canvases, tmp_path)
    meta = cache.path / "meta.json"
    meta.write_text(meta.read_text()[:100])
    with pytest.raises(DataError, match=rf"{meta} is damaged \(JSONDecodeError.*delete {cache.path} and extract again"):
        TokenCache.open(cache.path)
    with pytest.warns(UserWarning, match="is damaged"):
        again = extract(test_vit_backbone, small_canvases, tmp_path)
    assert not again.hit and again.path == cache.path and len(again) == 48


def test_verify_checks_every_shard_against_its_checksum(tmp_path, test_vit_backbone, small_canvases, capsys):
    cache = extract(test_vit_backbone, small_canvases, tmp_path)
    other = extract(test_vit_backbone, small_canvases, tmp_path, layers=[2, 5])
    assert verify_cache(cache.path).meta["key"] == cache.meta["key"]
    main(["cache", "verify", "--cache-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted(
        [f"ok   {cache.path} (48 images, layers [5], float16)", f"ok   {other.path} (48 images, layers [2, 5], float16)"]
    )
    path = cache.path / "L005_patch.npy"
    with open(path, "r+b") as fh:  # one flipped byte in the data of shard 1 (images 16-31): the header reads as before
        fh.seek(path.stat().st_size - 32 * 100 * 64 * 2 + 7)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x10]))
    TokenCache.open(cache.path)  # the cheap checks read no data
    with pytest.raises(DataError, match=rf"{path}: rows 16-31 \(images 16-31\) do not match the checksum"):
        verify_cache(cache.path)
    with pytest.raises(SystemExit, match="1 of 1 token caches failed"):
        main(["cache", "verify", "--cache-dir", str(tmp_path), cache.meta["key"][:12]])
    assert capsys.readouterr().out.startswith(f"BAD  {cache.path}: {path}: rows 16-31")
    with pytest.raises(SystemExit, match="1 of 2 token caches failed"):
        main(["cache", "verify", "--cache-dir", str(tmp_path), str(other.path), "nosuchkey"])
    assert "BAD  nosuchkey: no token cache folder or key 'nosuchkey'" in capsys.readouterr().out


class Slow(ClutteredFashionMNIST):
    """Canvases that tell when the first batch is read, then take their time."""

    started = threading.Event()

    def image_batch(self, index):
        self.started.set()
        time.sleep(0.3)
        return super().image_batch(index)


def test_two_writers_of_one_cache_take_turns_and_the_second_finds_the_first(tmp_path, test_vit_backbone, small_canvases):
    results, errors = {}, {}

    def run(name, dataset):
        try:
            results[name] = extract(test_vit_backbone, dataset, tmp_path)
        except Exception as err:  # noqa: BLE001 - reported below
            errors[name] = err

    first = threading.Thread(target=run, args=("first", Slow("test", 48, seed=3)))
    first.start()
    assert Slow.started.wait(60)
    second = threading.Thread(target=run, args=("second", small_canvases))  # the same key, while the first extracts
    second.start()
    first.join(120)
    second.join(120)
    assert not errors, errors
    assert not results["first"].hit and results["second"].hit and results["first"].path == results["second"].path
    np.testing.assert_array_equal(np.asarray(results["second"].patch(5)), np.asarray(results["first"].patch(5)))
    assert [p.name for p in tmp_path.iterdir()] == [results["first"].path.name], "no partial folder or lock file is left"


def test_nan_tokens_in_a_cache_are_refused_by_the_evaluation_and_remembered(tmp_path, test_vit_backbone, small_canvases):
    cache = extract(test_vit_backbone, small_canvases, tmp_path)
    tokens = cache.tokens(5)
    assert tokens._finite is None, "finite at extraction: known without a scan"
    probe = probes.build("ep", 64, 10, num_queries=2, seed=0)
    assert 0.0 <= accuracy(probe, tokens)["top1"] <= 1.0
    time.sleep(0.05)  # a later edit: the file's modification time moves on
    path = cache.path / "L005_patch.npy"
    data = np.lib.format.open_memmap(path, mode="r+")
    data[30, 4, 2] = np.nan
    data.flush()
    del data
    fresh = TokenCache.open(cache.path)
    for in_memory in (False, True):
        with pytest.raises(
            DataError,
            match=rf"the tokens \(token cache {cache.path.name}\) contain NaN or inf \(patch tokens of sample 30; 1 of 48",
        ):
            accuracy(probe, fresh.tokens(5, in_memory=in_memory))
    remembered = json.loads((cache.path / "meta.json").read_text())["finite"]["L005"]["nonfinite"]
    assert remembered == {"first": 30, "part": "patch", "count": 1, "total": 48}, "the scan is kept in the manifest"
    assert TokenCache.open(cache.path).tokens(5)._finite.first == 30, "the next reader does not scan again"
    TokenCache.open(cache.path)  # the memo is outside the manifest's checksum
