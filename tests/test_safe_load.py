"""Reading checkpoints without unpickling them."""

import argparse

import torch

from epviz.safe_load import is_torch_checkpoint, strip_ansi, unsafe_globals


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


def test_torch_checkpoints_are_told_from_other_files(tmp_path):
    zipped, legacy, text = tmp_path / "new.pth", tmp_path / "old.pth", tmp_path / "notes.pth"
    torch.save({"w": torch.zeros(2)}, zipped)
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    text.write_text("not weights\n")
    assert is_torch_checkpoint(zipped) and is_torch_checkpoint(legacy)
    assert not is_torch_checkpoint(text)
