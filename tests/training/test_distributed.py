"""Data-parallel training: two gloo processes give what one process gives on the same global batch.

The two-process runs happen once per module (:func:`two_ranks`: two fresh interpreters running
``tests/training/_ddp_worker.py``); each test compares one scenario of them with the same scenario
run here, in one process.
"""

import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import epviz.probes as probes
from epviz.errors import ConfigError
from tests.data.formats import write_imagenet
from tests.training import _ddp_worker as worker

fit_images_module = importlib.import_module("epviz.training.fit_images")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # both ranks together; a hang fails the tests instead of blocking
ATOL = 1e-5
HISTORY = ["train_loss", "train_acc", "val_loss", "val_acc", "lr"]


@pytest.fixture(scope="module")
def images_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root, train_per_class=6, val_per_class=2, size=(48, 40))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, images_root) -> list[dict]:
    """Every scenario of the worker, run by two gloo processes; one result dict per rank."""
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    procs = []
    for r in range(2):
        env = dict(
            os.environ,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            EPVIZ_DEVICE="cpu",
            EPVIZ_CACHE=str(out / "cache"),
            OMP_NUM_THREADS="1",
        )
        log = open(out / f"rank{r}.log", "w")  # noqa: SIM115  closed below
        cmd = [sys.executable, "-m", "tests.training._ddp_worker", str(out), str(images_root)]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(
        f"--- rank {r} (exit {p.returncode}) ---\n" + (out / f"rank{r}.log").read_text()[-4000:] for r, (p, _) in enumerate(procs)
    )
    if any(p.returncode != 0 for p, _ in procs):
        pytest.fail(f"the two-process run failed or exceeded {TIMEOUT_S} s:\n{logs}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_same_fit(got: dict, want: dict) -> None:
    assert got["history"]["epoch"] == want["history"]["epoch"]
    for column in HISTORY:
        np.testing.assert_allclose(got["history"][column], want["history"][column], atol=ATOL, rtol=0, err_msg=column)
    assert got["best_epoch"] == want["best_epoch"]
    assert_same_state(got["state"], want["state"])


def assert_same_state(got: dict, want: dict, atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("scenario", ["fit_dolg", "fit_ep", "fit_cae"])
def test_fit_on_two_processes_equals_one_process(two_ranks, scenario):
    one = getattr(worker, scenario)()
    for rank in two_ranks:
        assert_same_fit(rank[scenario], one)
        assert rank[scenario]["config"]["world_size"] == 2
        assert rank[scenario]["norm_classes"] == one["norm_classes"], "the returned probe holds plain BatchNorm again"
    assert_same_state(two_ranks[0][scenario]["state"], two_ranks[1][scenario]["state"], atol=0)
    assert "BatchNorm1d" in one["norm_classes"]


def test_without_the_batchnorm_sync_two_processes_would_differ(two_ranks):
    one = worker.fit_dolg()
    synced, unsynced = two_ranks[0]["fit_dolg"]["state"], two_ranks[0]["fit_dolg_unsynced"]["state"]
    assert max_difference(synced, one["state"]) <= ATOL
    assert max_difference(unsynced, one["state"]) > 100 * ATOL, "per-rank batch statistics change the training"


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(two_ranks):
    for rank in two_ranks:
        message = rank["fit_odd_batch"]
        assert "batch_size=15" in message and "multiple of 2" in message and "batch_size=14 or 16" in message


def test_ranks_given_different_options_are_refused_on_every_rank(two_ranks):
    for rank in two_ranks:
        fit_message, grid_message = rank["ranks_disagree"]
        assert "the ranks disagree on the fit options and data sizes" in fit_message and "0.25" in fit_message
        assert "the ranks disagree on the fit_grid options and data sizes" in grid_message


def test_fit_grid_on_two_processes_equals_one_process(two_ranks):
    one = worker.grid()
    for rank in two_ranks:
        got = rank["grid"]
        assert got["history"]["epoch"] == one["history"]["epoch"] and got["history"]["point"] == one["history"]["point"]
        for column in ("train_loss", "train_acc", "val_loss", "val_acc"):
            np.testing.assert_allclose(got["history"][column], one["history"][column], atol=ATOL, rtol=0, err_msg=column)
        assert got["points"]["best_epoch"] == one["points"]["best_epoch"]
        for head, want in zip(got["states"], one["states"]):
            assert_same_state(head, want)


def test_only_rank_0_writes_the_probe_cache_and_every_rank_reads_it(two_ranks):
    main, other = (rank["probe_cache"] for rank in two_ranks)
    assert main["writes"] == ["history", "weights"] and other["writes"] == []
    assert main["complete_after_first"] and other["complete_after_first"], "no rank goes on before the entry is complete"
    assert not main["first_cached"] and not other["first_cached"]
    assert main["second_cached"] == other["second_cached"] is not None, "the second call loads on every rank"


def test_fit_images_with_accumulation_on_two_processes_equals_one_large_batch(two_ranks, images_root, monkeypatch):
    monkeypatch.setattr(fit_images_module, "_SEED_EVERY_IMAGE", True)  # the crops two processes draw
    one = worker.images_plain(images_root, accum_steps=1)
    assert "accum_steps" not in one["config"]
    for rank in two_ranks:
        assert rank["images_plain"]["config"]["accum_steps"] == 2
        assert_same_fit(rank["images_plain"], one)


def test_fit_images_with_batchnorm_on_two_processes_equals_one_process(two_ranks, images_root, monkeypatch):
    monkeypatch.setattr(fit_images_module, "_SEED_EVERY_IMAGE", True)
    one = worker.images_batchnorm(images_root, accum_steps=2)
    for rank in two_ranks:
        assert_same_fit(rank["images_batchnorm"], one)
        assert rank["images_batchnorm"]["norm_classes"] == ["BatchNorm1d"]


def test_accumulation_on_one_process_equals_one_large_batch_step(images_root):
    large, accumulated = worker.images_plain(images_root, accum_steps=1), worker.images_plain(images_root, accum_steps=4)
    assert_same_fit(accumulated, large)


def test_accumulation_normalises_each_micro_batch_with_its_own_batchnorm_statistics(images_root):
    large, accumulated = worker.images_batchnorm(images_root, accum_steps=1), worker.images_batchnorm(images_root, accum_steps=4)
    assert max_difference(accumulated["state"], large["state"]) > 100 * ATOL


@pytest.mark.parametrize(
    "options, names",
    [
        (dict(accum_steps=0), "accum_steps must be a positive integer"),
        (dict(accum_steps=1.5), "accum_steps must be a positive integer"),
        (dict(accum_steps=True), "accum_steps must be a positive integer"),
        (dict(accum_steps="2"), "accum_steps must be a positive integer"),
        (dict(batch_size=6, accum_steps=4), r"batch_size=6 .* multiple of 4 \(batch_size=4 or 8\), or change accum_steps"),
    ],
)
def test_accum_steps_out_of_range_are_config_errors(images_root, options, names):
    train, _ = worker.image_sets(images_root)
    probe = probes.build("ep", 64, worker.C, num_queries=4)
    with pytest.raises(ConfigError, match=names):
        fit_images_module.fit_images(probe, worker.tiny_backbone(), train, **{**worker.IMAGES, **options})


def test_a_training_set_too_small_for_the_micro_batches_is_refused(images_root):
    train, _ = worker.image_sets(images_root)
    with pytest.raises(ConfigError, match="holds 3 samples, too few for 4 non-empty parts"):
        fit_images_module.fit_images(
            probes.build("ep", 64, worker.C, num_queries=4),
            worker.tiny_backbone(),
            train.subset([0, 6, 12]),
            **{**worker.IMAGES, "accum_steps": 4},
        )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_synced_batchnorm_shares_the_state_of_the_batchnorm_it_stands_in_for(device):
    from epviz.training.distributed_fit import SyncedBatchNorm, _synced

    bn = torch.nn.BatchNorm1d(5, momentum=0.3)
    synced = _synced(bn, torch.device(device))  # built only: nothing runs on the device
    assert isinstance(synced, torch.nn.SyncBatchNorm if device == "cuda" else SyncedBatchNorm)
    assert synced.weight is bn.weight and synced.bias is bn.bias
    assert synced.running_mean is bn.running_mean and synced.running_var is bn.running_var
    assert synced.num_batches_tracked is bn.num_batches_tracked


def test_outside_a_process_group_a_synced_batchnorm_is_the_batchnorm_itself():
    from epviz.training.distributed_fit import SyncedBatchNorm

    x = torch.randn(8, 5, 3)
    plain, twin = torch.nn.BatchNorm1d(5), torch.nn.BatchNorm1d(5)
    synced = SyncedBatchNorm(twin)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(twin.running_var, plain.running_var, rtol=0, atol=0)
    synced.eval()
    plain.eval()
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
