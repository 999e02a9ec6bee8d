"""Reading checkpoints without unpickling them."""

import argparse

import torch

from epviz.safe_load import strip_ansi, unsafe_globals


def test_ansi_codes_are_stripped_from_quoted_errors():
    assert strip_ansi("a \x1b[1mbold\x1b[0m word") == "a bold word"


def test_the_globals_a_checkpoint_needs_are_named_without_unpickling(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    try:
        torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch raises, the names come from the file
        assert unsafe_globals(path, err) == ["argparse.Namespace"]
    else:
        raise AssertionError("a Namespace must not load with weights_only=True")
