"""TokenSet: argument checks at construction, the streamed finiteness scan, batching arguments."""

import numpy as np
import pytest

from epviz.errors import ConfigError, DataError
from epviz.tokens import TokenSet


def make(n=12, labels=None, grid=(2, 2), num_classes=None, prefix=True):
    rng = np.random.default_rng(0)
    patch = rng.normal(size=(n, 4, 8)).astype(np.float16)
    pre = rng.normal(size=(n, 1, 8)).astype(np.float16) if prefix else None
    return TokenSet(patch, pre, np.arange(n) % 3 if labels is None else labels, grid, num_classes=num_classes)


def test_labels_must_fit_num_classes():
    assert make(num_classes=3).num_classes == 3
    with pytest.raises(
        ConfigError, match=r"labels range from 0 to 2 but num_classes=2: labels must lie in \[0, 1\] \(4 of 12 samples"
    ):
        make(num_classes=2)
    with pytest.raises(ConfigError, match="labels range from -1"):
        make(labels=np.r_[-1, np.arange(11) % 3], num_classes=3)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
            make(num_classes=bad)


def test_labels_must_be_integer_class_indices():
    with pytest.raises(DataError, match="fractional"):
        make(labels=np.linspace(0, 2, 12))
    assert make(labels=np.arange(12.0) % 3).labels.dtype == np.int64
    with pytest.raises(DataError, match="one class index per image"):
        make(labels=np.zeros((12, 2), int))
    with pytest.raises(DataError, match="11 labels for 12"):
        make(labels=np.zeros(11, int))


@pytest.mark.parametrize("grid", [(4, 1, 1), (0, 4), (-2, -2), "2x2", (2.5, 1.6), None])
def test_grid_must_be_two_positive_integers(grid):
    with pytest.raises(ConfigError, match="grid must be"):
        make(grid=grid)


def test_grid_must_cover_the_tokens():
    with pytest.raises(ConfigError, match=r"grid \(1, 2\) has 2 cells but there are 4 patch tokens"):
        make(grid=(1, 2))
    assert make(grid=(np.int64(4), 1.0)).grid == (4, 1)


def test_batch_size_and_subset_arguments():
    ts = make()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
            next(ts.batches(bad))
    assert len(next(ts.batches(2.0)).labels) == 2  # a whole float is that integer
    with pytest.raises(ConfigError, match=r"index must lie in \[0, 12\)"):
        ts.subset([3, 12])


def test_find_nonfinite_streams_and_names_the_first_bad_sample(tmp_path):
    ts = make(n=30)
    assert ts.find_nonfinite() is None
    ts.prefix[21, 0, 0] = np.inf
    ts.patch[25, 1, 1] = np.nan
    ts.patch[21, 0, 0] = np.nan
    found = ts.find_nonfinite(chunk_bytes=1)  # one sample per chunk
    assert (found.first, found.part, found.count, found.total) == (21, "patch", 2, 30)
    ts.patch[21, 0, 0] = 0.0
    assert ts.find_nonfinite().part == "prefix", "writable arrays are scanned afresh"


def test_find_nonfinite_remembers_read_only_memory_maps(tmp_path):
    ts = make(n=20)
    patch = np.array(ts.patch)
    patch[7, 0, 0] = np.nan
    np.save(tmp_path / "p.npy", patch)
    mapped = TokenSet(np.load(tmp_path / "p.npy", mmap_mode="r"), None, ts.labels, ts.grid)
    first = mapped.find_nonfinite(chunk_bytes=64)
    assert first.first == 7 and first.count == 1
    mapped.patch = np.zeros_like(patch)  # a read-only map cannot change; the answer is kept
    mapped.patch.flags.writeable = False
    assert mapped.find_nonfinite() is first


def test_labels_and_tokens_replaced_after_construction_are_refused_on_every_read():
    import epviz.probes as probes
    from epviz.evaluate import accuracy

    ts = make(n=37)
    ts.labels = ts.labels[:30]  # would be scored over 30 of the 37 samples
    reads = [
        lambda: accuracy(probes.build("gap", 8, 3), ts),
        lambda: next(ts.batches(8)),
        lambda: ts.batch(np.array([0, 1])),
        lambda: ts.subset([0]),
        lambda: ts.load(),
        lambda: ts.find_nonfinite(),
        lambda: ts.for_epoch(0, 0),
    ]
    for read in reads:
        with pytest.raises(
            DataError, match="30 labels for 37 token sets; they must match .*replaced after the TokenSet was built"
        ):
            read()
    ts = make(n=12)
    ts.prefix = ts.prefix[:10]
    with pytest.raises(DataError, match="prefix tokens cover 10 images, patch tokens 12"):
        next(ts.batches(4))
    ts = make(n=12)
    ts.patch = ts.patch[:, :2]
    with pytest.raises(ConfigError, match=r"grid \(2, 2\) has 4 cells but there are 2 patch tokens"):
        ts.batch(np.array([0]))


def test_load_copies_a_memory_map_into_ram(tmp_path):
    stored = make()
    path = tmp_path / "patch.npy"
    np.save(path, stored.patch)
    on_disk = TokenSet(np.load(path, mmap_mode="r"), None, stored.labels, stored.grid)
    loaded = on_disk.load()
    assert not isinstance(loaded.patch, np.memmap) and loaded.patch.base is None
    np.testing.assert_array_equal(loaded.patch, stored.patch)
