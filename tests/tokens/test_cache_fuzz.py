"""Fuzzing a small token cache on disk: truncated, flipped, deleted, appended-to and swapped files, a file
replaced by a same-size array of another dtype, edited manifests (as they are, or resealed with a fresh
checksum). Reading the damaged cache (open + verify_cache, or extract_tokens + verify_cache) has two
outcomes only: the correct tokens, or an epviz error whose message names the cache's folder. (A resealed
manifest of another grid is consistent in itself: only extract_tokens, which knows the backbone's grid,
can refuse it.)"""

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epviz.errors import EpvizError
from epviz.tokens import extract_tokens
from epviz.tokens.cache import _manifest_digest, verify_cache

OPTIONS = dict(layers=[2, 5], batch_size=16, shard_size=16, progress=False)  # 3 shards of 48 canvases
FILES = ["meta.json", "labels.npy", "L002_patch.npy", "L002_prefix.npy", "L005_patch.npy", "L005_prefix.npy",
         "shards/000001.json", "plan.json"]  # fmt: skip
ARRAYS = [f for f in FILES if f.endswith(".npy")]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, test_vit_backbone, small_canvases):
    """A complete cache, and what reading it must give."""
    root = tmp_path_factory.mktemp("pristine")
    cache = extract_tokens(test_vit_backbone, small_canvases, cache_dir=root, **OPTIONS)
    return cache.path, read(cache)


def read(cache) -> dict:
    arrays = {"labels": cache.labels, "grid": np.array(cache.grid), "len": np.array(len(cache))}
    for layer in (2, 5):
        arrays[f"patch{layer}"] = np.asarray(cache.patch(layer))
        arrays[f"prefix{layer}"] = np.asarray(cache.prefix(layer))
    return arrays


def flip(path: Path, position: int, mask: int) -> None:
    raw = bytearray(path.read_bytes())
    if raw:
        raw[position % len(raw)] ^= mask
        path.write_bytes(bytes(raw))


def truncate(path: Path, fraction: float) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(int(path.stat().st_size * fraction))


def same_size_other_dtype(path: Path, dtype: str) -> None:
    """Replace a .npy file by one of another dtype (and so shape) whose data has the same byte count."""
    old = np.load(path, mmap_mode="r")
    count = old.nbytes // np.dtype(dtype).itemsize
    np.save(
        path,
        np.zeros((old.shape[0], count // old.shape[0]), dtype=dtype) if count % old.shape[0] == 0 else np.zeros(count, dtype),
    )


def edit(path: Path, change, reseal: bool) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    if reseal:  # a manifest consistent in itself that says something else
        meta["manifest_blake2b"] = _manifest_digest(meta)
    path.write_text(json.dumps(meta))


MANIFEST_EDITS = {
    "key": lambda m: m.update(key="0" * 64),
    "key-prefix": lambda m: m.update(key=m["key"][:20] + "f" * 44),
    "grid": lambda m: m["backbone"].update(grid=[5, 20]),
    "grid-size": lambda m: m["backbone"].update(grid=[7, 7]),
    "images": lambda m: m.update(num_images=m["num_images"] - 8),
    "no-shards": lambda m: m.pop("shards"),
    "shards": lambda m: m.update(shards=[[0, 16], [16, 30], [30, 48]]),
    "no-arrays": lambda m: m.pop("arrays"),
    "shape": lambda m: m["arrays"]["L005_patch.npy"].update(shape=[48, 50, 128]),
    "checksum": lambda m: m["arrays"]["L002_prefix.npy"]["blake2b"].reverse(),
    "views": lambda m: m.update(views=2),
    "layers": lambda m: m.update(layers=[2]),
    "dtype": lambda m: m.update(dtype="float32"),
    "dim": lambda m: m.update(dim=32),
    "prefix": lambda m: m.update(num_prefix_tokens=0),
    "no-key": lambda m: m.pop("key"),
    "backbone": lambda m: m.update(backbone=[]),
    "split": lambda m: m.update(split="val"),  # outside the checksum: harmless
    "finite": lambda m: m.update(finite={"L005": {"files": 3}}),  # likewise
}

CONSISTENT = {"grid"}  # resealed, these say something the files agree with: only the caller's expectation differs


def damages(resealed: set[str]) -> st.SearchStrategy:
    """Damages of a cache; manifest edits resealed with a fresh checksum only for the names in `resealed`."""
    return st.one_of(
        st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0.0, 0.999)),
        st.tuples(st.just("flip"), st.sampled_from(FILES), st.integers(0, 10**6), st.integers(1, 255)),
        st.tuples(st.just("flip-header"), st.sampled_from(ARRAYS), st.integers(0, 127), st.integers(1, 255)),
        st.tuples(st.just("delete"), st.sampled_from(FILES)),
        st.tuples(st.just("append"), st.sampled_from(FILES), st.binary(min_size=1, max_size=64)),
        st.lists(st.sampled_from(ARRAYS), min_size=2, max_size=2, unique=True).map(lambda pair: ("swap", *pair)),
        st.tuples(st.just("other-dtype"), st.sampled_from(ARRAYS), st.sampled_from(["int16", "uint8", "float32", "int64"])),
        st.tuples(st.just("manifest"), st.sampled_from(sorted(MANIFEST_EDITS)), st.just(False)),
        st.tuples(st.just("manifest"), st.sampled_from(sorted(resealed)), st.just(True)),
    )


def damage(folder: Path, how: tuple) -> None:
    kind, name, *args = how
    path = folder / name
    if kind == "truncate":
        truncate(path, *args)
    elif kind in ("flip", "flip-header"):
        flip(path, *args)
    elif kind == "delete":
        path.unlink()
    elif kind == "append":
        with open(path, "ab") as fh:
            fh.write(args[0])
    elif kind == "swap":
        other = folder / args[0]
        tmp = folder / "swap.tmp"
        path.rename(tmp)
        other.rename(path)
        tmp.rename(other)
    elif kind == "other-dtype":
        same_size_other_dtype(path, *args)
    else:
        edit(folder / "meta.json", MANIFEST_EDITS[name], *args)


def assert_correct_or_named(load, folder: Path, expected: dict) -> None:
    try:
        got = load()
    except EpvizError as err:
        assert str(folder) in str(err), f"the error does not name {folder}: {err}"
        return
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{name} is not what the cache holds")


@FUZZ
@given(how=damages(set(MANIFEST_EDITS) - CONSISTENT))
def test_a_damaged_cache_reads_correctly_or_fails_naming_its_folder(pristine, how):
    source, expected = pristine
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / source.name
        shutil.copytree(source, folder)
        damage(folder, how)
        assert_correct_or_named(lambda: read(verify_cache(folder)), folder, expected)


@settings(FUZZ, max_examples=15)
@given(how=damages(set(MANIFEST_EDITS)))
def test_extract_tokens_on_a_damaged_cache_gives_the_tokens_or_names_the_folder(pristine, test_vit_backbone, small_canvases, how):
    source, expected = pristine
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / source.name
        shutil.copytree(source, folder)
        damage(folder, how)

        def load():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unfinished cache is extracted again, with a warning
                cache = extract_tokens(test_vit_backbone, small_canvases, cache_dir=tmp, **OPTIONS)
            return read(verify_cache(cache.path))

        assert_correct_or_named(load, folder, expected)
