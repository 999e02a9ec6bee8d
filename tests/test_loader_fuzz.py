"""Damaged and hostile files, generated: each loads as the probe it was, or is refused naming the file.

Two small files are fuzzed: a reference head in its release layout (``ep_head.pth`` + ``config.json``,
see :mod:`tests.data.formats`) and a probe saved by :func:`epviz.training.save_probe` (``.json`` +
``.safetensors``). Each example damages one of them: truncation, a flipped byte, a JSON field set to
another size, type or nesting, a tensor replaced by a stride-0 expansion, a negative BatchNorm running
variance, a NaN or an inf. Only two outcomes are allowed: a probe whose logits are exactly the
original's, or an :class:`epviz.errors.EpvizError` whose message names the damaged file. Anything
else (a RuntimeError, a RecursionError, other logits) fails.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epviz.errors import EpvizError
from epviz.probes import build
from epviz.training import load_probe, load_reference_head, save_probe
from tests.data.formats import reference_head_state, write_reference_release

D, C, M = 8, 3, 2
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
NEST = "__nest__"  # a JSON value replaced by lists nested this many deep, written as text (json.dumps would recurse)


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 9, D, generator=g), torch.randn(2, 1, D, generator=g)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The two files' bytes, and the logits of what they hold."""
    root = tmp_path_factory.mktemp("originals")
    state = reference_head_state("ep", dim=D, num_classes=C, num_queries=M)
    head = write_reference_release(root / "release", state)
    probe = build("ep", D, C, num_queries=M, seed=0).eval()
    with torch.no_grad():
        probe.norm.running_var.uniform_(0.5, 1.5)
        probe.norm.running_mean.normal_()
    save_probe(probe, root / "saved" / "probe")
    patch, prefix = _tokens()
    return {
        "reference": {
            "files": {name: (head.parent / name).read_bytes() for name in ("ep_head.pth", "config.json")},
            "state": state,
            "logits": load_reference_head(head)(patch, prefix).detach(),
        },
        "saved": {
            "files": {name: (root / "saved" / name).read_bytes() for name in ("probe.json", "probe.safetensors")},
            "logits": probe(patch, prefix).detach(),
        },
    }


def _check(load, folder: Path, damaged: str, expected: torch.Tensor) -> None:
    """`load()` gives `expected` logits exactly, or an epviz error naming `damaged`."""
    try:
        probe = load(folder)
    except EpvizError as err:
        assert damaged in str(err), f"the message does not name {damaged}: {err}"
        return
    with torch.no_grad():
        torch.testing.assert_close(probe(*_tokens()), expected, rtol=0, atol=0)


def _json_value():
    return st.one_of(
        st.integers(min_value=-(10**12), max_value=10**12),
        st.sampled_from([0, 1, 2, 3, 4, 10**5, 10**5 + 1, 10**9]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.sampled_from(["3", "2", "1e9", "ep", "cls", "pos", "ep_all", "first", "mean", "timm"]),
        st.booleans(),
        st.none(),
        st.lists(st.integers(min_value=-5, max_value=10**6), max_size=3),
        st.integers(min_value=1, max_value=5000).map(lambda depth: (NEST, depth)),
    )


def _damage():
    """(kind, arguments) of one damage to one file."""
    return st.one_of(
        st.tuples(st.just("truncate"), st.floats(min_value=0, max_value=1, exclude_max=True)),
        st.tuples(st.just("flip"), st.floats(min_value=0, max_value=1, exclude_max=True), st.integers(1, 255)),
        st.tuples(st.just("json"), st.integers(0, 99), _json_value()),
    )


def _apply(data: bytes, damage: tuple, fields: list[tuple[str, ...]]) -> bytes:
    kind = damage[0]
    if kind == "truncate":
        return data[: int(damage[1] * len(data))]
    if kind == "flip":
        out = bytearray(data)
        out[int(damage[1] * len(out))] ^= damage[2]
        return bytes(out)
    doc = json.loads(data)
    *parents, key = fields[damage[1] % len(fields)]
    target = doc
    for parent in parents:
        target = target[parent]
    value = damage[2]
    if isinstance(value, tuple):  # nested lists, as text
        target[key] = NEST
        return json.dumps(doc).replace(f'"{NEST}"', "[" * value[1] + "]" * value[1]).encode()
    target[key] = value
    return json.dumps(doc).encode()


REFERENCE_FIELDS = [
    (k,)
    for k in ("ep_queries", "d_out", "num_classes", "nb_classes", "dim", "head_epoch", "image_size",
              "val_acc1_at_head_epoch", "table_best_acc1", "cls_features", "loader", "prefix", "method", "note")
]  # fmt: skip
SAVED_FIELDS = [
    ("probe", "dim"), ("probe", "num_classes"), ("probe", "num_queries"), ("probe", "d_out"), ("probe", "name"),
    ("probe", "source"), ("format",), ("weights_sha256",), ("card", "val_acc"), ("card",),
]  # fmt: skip


def _reference_state_damage():
    """Damage to the head's tensors, written back with torch.save."""
    keys = ["0.cls_token", "0.v.weight", "1.running_mean", "1.running_var", "2.weight", "2.bias"]
    return st.one_of(
        st.tuples(st.just("expand"), st.sampled_from(keys), st.sampled_from([1, 1000, 10**6])),
        st.tuples(st.just("negative_var"), st.integers(0, D - 1)),
        st.tuples(st.just("value"), st.sampled_from(keys), st.sampled_from([float("nan"), float("inf"), -float("inf")])),
    )


def _damaged_state(state: dict, damage: tuple) -> dict:
    state = {k: v.clone() for k, v in state.items()}
    kind, *args = damage
    if kind == "expand":  # same values in the same shape (factor 1), or a larger declared first dimension
        key, factor = args
        shape = list(state[key].shape)
        shape[0] *= factor
        state[key] = state[key].reshape(-1)[:1].reshape([1] * len(shape)).expand(*shape)
    elif kind == "negative_var":
        state["1.running_var"][args[0]] = -state["1.running_var"][args[0]]
    else:
        key, value = args
        state[key].view(-1)[0] = value
    return state


def _folder_with(files: dict[str, bytes]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="epviz-fuzz-"))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _check_damaged(original: dict, which: str, damage: tuple, fields, load) -> None:
    """Apply `damage` to the file `which` of `original` (a JSON damage to its JSON file only), then check `load`."""
    files = dict(original["files"])
    if which.endswith(".json") or damage[0] != "json":
        files[which] = _apply(files[which], damage, fields)
    folder = _folder_with(files)
    try:
        _check(load, folder, which, original["logits"])
    finally:
        shutil.rmtree(folder)


@SETTINGS
@given(which=st.sampled_from(["ep_head.pth", "config.json"]), damage=_damage())
def test_damaged_reference_heads_load_as_they_were_or_are_refused(originals, which, damage):
    _check_damaged(originals["reference"], which, damage, REFERENCE_FIELDS, load_reference_head)


@SETTINGS
@given(damage=_reference_state_damage())
def test_hostile_reference_tensors_are_refused(originals, damage):
    original = originals["reference"]
    folder = _folder_with(original["files"])
    try:
        meta = json.loads(original["files"]["config.json"])
        torch.save({"state_dict": _damaged_state(original["state"], damage), "meta": meta}, folder / "ep_head.pth")
        assert (folder / "ep_head.pth").stat().st_size < 20_000  # what it declares is not in the file
        with pytest.raises(EpvizError, match="ep_head.pth"):
            load_reference_head(folder)
    finally:
        shutil.rmtree(folder)


@SETTINGS
@given(which=st.sampled_from(["probe.json", "probe.safetensors"]), damage=_damage())
def test_damaged_saved_probes_load_as_they_were_or_are_refused(originals, which, damage):
    _check_damaged(originals["saved"], which, damage, SAVED_FIELDS, lambda f: load_probe(f / "probe"))


@SETTINGS
@given(
    key=st.sampled_from(["queries", "value.weight", "norm.running_mean", "norm.running_var", "head.weight", "head.bias"]),
    value=st.sampled_from([float("nan"), float("inf"), -1.0]),
)
def test_hostile_saved_probe_tensors_are_refused(originals, key, value):
    from safetensors.torch import load, save

    original = originals["saved"]
    state = load(original["files"]["probe.safetensors"])
    state[key].view(-1)[0] = value
    if value == -1.0 and key != "norm.running_var":
        state[key].view(-1)[0] = float("nan")
    folder = _folder_with({**original["files"], "probe.safetensors": save(state)})
    try:
        with pytest.raises(EpvizError, match="probe.safetensors"):
            load_probe(folder / "probe")
    finally:
        shutil.rmtree(folder)
