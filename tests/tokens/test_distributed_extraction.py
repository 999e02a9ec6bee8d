"""Sharded and distributed extraction (gloo, 2 processes under torchrun): equivalence, resume after
kill -9, and the bad inputs: more ranks than images, ranks that disagree on the key, shards of
another key, a manifest naming a missing shard, a full disk."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epviz.errors import ConfigError, DataError, StorageError
from epviz.tokens import TokenCache, extract_tokens, storage
from epviz.tokens import shards as shards_module

WORKER = Path(__file__).with_name("_extract_worker.py")
IMAGES, SHARD = 40, 8  # 5 shards: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3


def torchrun(cache_dir: Path, out_dir: Path, mode: str = "normal", images: int = IMAGES, shard: int = SHARD, procs: int = 2):
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(WORKER), str(cache_dir), str(out_dir), mode, str(images), str(shard)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def _read(out_dir: Path) -> list[int]:
    return sorted(int(line) for f in out_dir.glob("read-*.txt") for line in f.read_text().split())


def _canvases(images: int = IMAGES, seed: int = 3):
    from epviz.data import ClutteredFashionMNIST

    return ClutteredFashionMNIST("test", images, seed=seed)


def _assert_same_cache(a: TokenCache, b: TokenCache) -> None:
    assert a.layers == b.layers and len(a) == len(b)
    np.testing.assert_array_equal(a.labels, b.labels)
    for layer in a.layers:
        np.testing.assert_array_equal(np.asarray(a.patch(layer)), np.asarray(b.patch(layer)))
        np.testing.assert_array_equal(np.asarray(a.prefix(layer)), np.asarray(b.prefix(layer)))


def test_two_ranks_write_the_cache_one_process_writes(tmp_path, test_vit_backbone):
    run = torchrun(tmp_path / "dist", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    names = {(tmp_path / "out" / f"done-{r}.txt").read_text() for r in (0, 1)}
    assert len(names) == 1, "every rank returns the same cache"
    dist_cache = TokenCache.open(tmp_path / "dist" / names.pop())
    assert dist_cache.meta["world_size"] == 2 and len(dist_cache.meta["shards"]) == 5
    markers = [json.loads(p.read_text()) for p in sorted((dist_cache.path / "shards").glob("*.json"))]
    assert [m["rank"] for m in markers] == [0, 1, 0, 1, 0], "shard i is extracted by rank i % world"
    assert _read(tmp_path / "out") == list(range(IMAGES)), "each image is read once, by one rank"
    one = extract_tokens(test_vit_backbone, _canvases(), [2, 5], cache_dir=tmp_path / "one", batch_size=8, shard_size=SHARD,
                         progress=False)  # fmt: skip
    assert one.path.name == dist_cache.path.name, "same key, same folder name"
    _assert_same_cache(dist_cache, one)
    # the default single-process plan (one shard, other batches) gives the same tokens in the same order
    default = extract_tokens(test_vit_backbone, _canvases(), [2, 5], cache_dir=tmp_path / "default", batch_size=8,
                             progress=False)  # fmt: skip
    np.testing.assert_array_equal(default.labels, dist_cache.labels)
    np.testing.assert_allclose(np.asarray(default.patch(5), dtype=np.float32), np.asarray(dist_cache.patch(5), dtype=np.float32),
                               atol=1e-2)  # fmt: skip


def test_kill_9_of_one_rank_then_a_resume_redoes_only_the_missing_shards(tmp_path, test_vit_backbone):
    cache_dir = tmp_path / "cache"
    killed = torchrun(cache_dir, tmp_path / "killed", mode="kill")
    assert killed.returncode != 0
    partial = [p for p in cache_dir.iterdir() if not p.name.endswith(".partial-lock")]  # the killed run's lock file may stay
    assert len(partial) == 1 and partial[0].name.endswith(".partial-shards"), "only the resumable partial folder is left"
    with pytest.raises(DataError, match="not a complete token cache"):
        TokenCache.open(partial[0])
    done = {int(p.stem) for p in (partial[0] / "shards").glob("*.json")}
    assert 1 in done and 3 not in done, "rank 1 finished its first shard and died in its second"
    missing = sorted(set(range(5)) - done)
    resumed = torchrun(cache_dir, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = sorted(i for s in missing for i in range(s * SHARD, (s + 1) * SHARD))
    assert _read(tmp_path / "resumed") == expected, "the resume reads only the images of the shards without a marker"
    cache = TokenCache.open(cache_dir / (tmp_path / "resumed" / "done-0.txt").read_text())
    one = extract_tokens(test_vit_backbone, _canvases(), [2, 5], cache_dir=tmp_path / "one", batch_size=8, shard_size=SHARD,
                         progress=False)  # fmt: skip
    _assert_same_cache(cache, one)


def test_ranks_that_disagree_on_the_key_are_refused(tmp_path):
    run = torchrun(tmp_path / "cache", tmp_path / "out", mode="disagree")
    assert run.returncode != 0 and (tmp_path / "out" / "error-1.txt").is_file(), run.stderr[-3000:]
    for r in (0, 1):
        message = (tmp_path / "out" / f"error-{r}.txt").read_text()
        assert message.startswith("ConfigError") and "ranks disagree on the token cache key" in message
        assert "same dataset root" in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "nothing is written"


def test_more_ranks_than_images_are_refused(tmp_path):
    run = torchrun(tmp_path / "cache", tmp_path / "out", images=1, shard=1)
    assert run.returncode != 0 and (tmp_path / "out" / "error-0.txt").is_file(), run.stderr[-3000:]
    message = (tmp_path / "out" / "error-0.txt").read_text()
    assert "2 ranks for 1 images" in message and "at most 1 processes" in message


def test_shards_of_another_key_in_one_folder_are_refused(tmp_path):
    folder = tmp_path / "partial"
    spec = [shards_module.ArraySpec("labels.npy", "int64", (10,))]
    plan_a = shards_module.ShardPlan.for_world("a" * 64, 10, 1, shard_size=5)
    shards_module.prepare_files(folder, plan_a, spec)
    shards_module.write_marker(folder, plan_a, 0, {"seconds": 0.0})
    plan_b = shards_module.ShardPlan.for_world("b" * 64, 10, 1, shard_size=5)
    with pytest.raises(ConfigError, match="holds shards of another cache"):
        shards_module.prepare_files(folder, plan_b, spec)
    (folder / "plan.json").write_text(json.dumps(plan_b.as_dict()))  # a folder mixing plan b with a marker of a
    with pytest.raises(ConfigError, match="belongs to another cache"):
        shards_module.complete_shards(folder, plan_b)


def test_a_manifest_naming_a_missing_shard_never_reads_as_complete(tmp_path, test_vit_backbone):
    kwargs = dict(cache_dir=tmp_path, batch_size=8, shard_size=SHARD, progress=False)
    cache = extract_tokens(test_vit_backbone, _canvases(), [5], **kwargs)
    (cache.path / "shards" / "000003.json").unlink()
    with pytest.raises(DataError, match="names shard 3 \\(images 24-31\\)"):
        TokenCache.open(cache.path)
    with pytest.warns(UserWarning, match="names shard 3"):
        again = extract_tokens(test_vit_backbone, _canvases(), [5], **kwargs)
    assert not again.hit, "an incomplete cache is extracted again, never read"
    with open(again.path / "L005_patch.npy", "r+b") as fh:  # a truncated array file is refused, naming it
        fh.truncate(1000)
    with pytest.raises(DataError, match=f"{again.path / 'L005_patch.npy'} is truncated"):
        TokenCache.open(again.path)


def test_too_little_disk_is_refused_before_writing(tmp_path, test_vit_backbone, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(StorageError, match="needs .* more but only 1.0 kB are free") as err:
        extract_tokens(test_vit_backbone, _canvases(), [2, 5], cache_dir=tmp_path, progress=False)
    assert "dtype='int8'" in str(err.value) and "fewer layers" in str(err.value)
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_the_estimate_is_printed_and_matches_the_files(tmp_path, test_vit_backbone, capsys):
    cache = extract_tokens(test_vit_backbone, _canvases(), [2, 5], cache_dir=tmp_path, progress=True)
    line = [text for text in capsys.readouterr().out.splitlines() if text.startswith("token cache:")]
    assert line and "free in" in line[0]
    needed = storage.estimate_bytes(IMAGES, 2, 100, 1, 64, "float16")
    on_disk = sum(p.stat().st_size for p in cache.path.glob("*.npy"))
    assert abs(on_disk - needed) < 2000, "the estimate is the arrays' size (headers aside)"
    assert storage.format_bytes(needed) in line[0]


def test_a_full_disk_while_writing_keeps_the_finished_shards_and_resumes(tmp_path, test_vit_backbone, monkeypatch):
    calls = {"n": 0}
    real = shards_module.RowWriter.write

    def fill_up(self, block):
        calls["n"] += 1
        if calls["n"] > 12:  # two shards in (five writes per shard: labels, 2 layers x patch and prefix)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, block)

    monkeypatch.setattr(shards_module.RowWriter, "write", fill_up)
    kwargs = dict(cache_dir=tmp_path, batch_size=8, shard_size=SHARD, progress=False)
    with pytest.raises(StorageError, match="disk holding .* is full") as err:
        extract_tokens(test_vit_backbone, _canvases(), [2, 5], **kwargs)
    assert "re-run resumes" in str(err.value)
    (partial,) = list(tmp_path.iterdir())
    assert partial.name.endswith(".partial-shards")
    with pytest.raises(DataError, match="not a complete token cache"):
        TokenCache.open(partial)
    done = {int(p.stem) for p in (partial / "shards").glob("*.json")}
    assert done and len(done) < 5
    monkeypatch.setattr(shards_module.RowWriter, "write", real)
    cache = extract_tokens(test_vit_backbone, _canvases(), [2, 5], **kwargs)
    reference = extract_tokens(test_vit_backbone, _canvases(), [2, 5], **{**kwargs, "cache_dir": tmp_path / "ref"})
    _assert_same_cache(cache, reference)


def test_torchrun_epviz_extract_then_one_process_finds_the_same_cache(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    args = ["extract", "--backbone", "tiny-random", "--size", "16", "--shard-size", "4", "--cache-dir", str(tmp_path)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "epviz", *args]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [json.loads(text) for text in run.stdout.splitlines() if text.startswith("{")]  # rank 0 alone prints
    assert line["world_size"] == 2 and line["images"] == 16 and not line["hit"]
    again = subprocess.run([sys.executable, "-m", "epviz", *args], env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    single = json.loads(again.stdout.strip().splitlines()[-1])
    assert single["hit"] and single["path"] == line["path"], "one process finds the cache the two ranks wrote"
