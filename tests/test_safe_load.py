"""Reading checkpoints without unpickling them, and checking what a file declares before trusting it."""

import argparse
import json
import zipfile

import pytest
import torch

from epviz.errors import ConfigError, WeightsError
from epviz.safe_load import (
    MAX_JSON_DEPTH,
    check_archive,
    check_weights,
    config_int,
    config_number,
    is_torch_checkpoint,
    read_json,
    strip_ansi,
    torch_errors,
    unsafe_globals,
)


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


# --- what a file declares is checked before it is trusted ---------------------------------------


def test_expanded_and_strided_tensors_are_refused_before_their_values_are_read():
    expanded = torch.zeros(1).expand(10**8)  # 4 stored bytes that would materialise 400 MB
    with pytest.raises(WeightsError, match=r"head.pth: tensor 'w' of shape \(100000000,\) is an expansion \(stride 0"):
        check_weights({"w": expanded}, "head.pth")
    with pytest.raises(WeightsError, match="'w' of shape .* is a strided view"):
        check_weights({"w": torch.zeros(4, 4).t()}, "head.pth")
    with pytest.raises(WeightsError, match="holds 3 values, more than the 2"):
        check_weights({"w": torch.zeros(3)}, "head.pth", max_parameters=2)
    with pytest.raises(WeightsError, match="entry 'w' is a str"):
        check_weights({"w": "x"}, "head.pth")
    check_weights({"w": torch.zeros(1).expand(1, 1), "b": torch.zeros(0)}, "head.pth")  # size-1 dims need no stride


def test_batchnorm_running_variances_must_not_be_negative_and_values_finite():
    with pytest.raises(WeightsError, match=r"head.pth: tensor '1.running_var' is a BatchNorm running variance with 1 negative"):
        check_weights({"1.running_var": torch.tensor([1.0, -0.5]), "1.running_mean": torch.zeros(2)}, "head.pth")
    with pytest.raises(WeightsError, match="'1.running_mean' holds 1 NaN or inf"):
        check_weights({"1.running_var": torch.ones(2), "1.running_mean": torch.tensor([0.0, float("inf")])}, "head.pth")
    check_weights({"1.running_var": torch.zeros(2), "1.num_batches_tracked": torch.tensor(3)}, "head.pth")


def test_compressed_and_damaged_zip_checkpoints_are_refused_before_torch_load(tmp_path):
    torch.save({"w": torch.zeros(10**6)}, tmp_path / "plain.pth")
    check_archive(tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as src, zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert (tmp_path / "bomb.pth").stat().st_size < 10**5
    with pytest.raises(WeightsError, match=r"bomb.pth declares 4,000,\d+ bytes of records in a file of"):
        check_archive(tmp_path / "bomb.pth")
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, tmp_path / "flip.pth")
    data = bytearray((tmp_path / "flip.pth").read_bytes())
    data[data.index(torch.arange(1000, dtype=torch.float32).numpy().tobytes()[400:420]) + 2] ^= 0x10
    (tmp_path / "flip.pth").write_bytes(bytes(data))
    torch.load(tmp_path / "flip.pth", weights_only=True)  # torch reads the changed weight without a word
    with pytest.raises(WeightsError, match=r"flip.pth: a damaged zip archive \(the checksum of its record '.*data/0'"):
        check_archive(tmp_path / "flip.pth")
    (tmp_path / "legacy.pth").write_bytes(b"\x80\x02not a zip")
    check_archive(tmp_path / "legacy.pth")  # not a zip archive: torch.load's own checks apply


def test_json_is_read_only_when_small_shallow_and_an_object(tmp_path, monkeypatch):
    import epviz.safe_load as safe_load

    path = tmp_path / "config.json"
    for text in ("[" * 100_000 + "]" * 100_000, '{"a": ' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1)):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"config.json nests lists and objects more than {MAX_JSON_DEPTH} deep"):
            read_json(path, what="a config", fix="Fix it.")
    path.write_text('{"a": ' * MAX_JSON_DEPTH + "1" + "}" * MAX_JSON_DEPTH)
    assert read_json(path, what="a config", fix="Fix it.")
    path.write_text('{"n": ' + "9" * 5000 + "}")  # beyond Python's digit limit: a ValueError, not a JSONDecodeError
    with pytest.raises(ConfigError, match="config.json is not readable JSON"):
        read_json(path, what="a config", fix="Fix it.")
    path.write_text("[1, 2]")
    with pytest.raises(WeightsError, match="config.json holds a JSON list, not the object of a config"):
        read_json(path, what="a config", fix="Fix it.", error=WeightsError)
    monkeypatch.setattr(safe_load, "MAX_JSON_BYTES", 100)
    path.write_text(json.dumps({"pad": "x" * 200}))
    with pytest.raises(ConfigError, match=r"config.json is 2\d\d bytes, more than"):
        read_json(path, what="a config", fix="Fix it.")
    with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
        read_json(tmp_path / "absent.json", what="a config", fix="Fix it.")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (10, 10),
        (10.0, 10),
        ("10", "got '10'"),
        (True, "got True"),
        (10.5, "got 10.5"),
        (None, "got None"),
        ([10], r"got \[10\]"),
        (0, "got 0"),
        (10**6, "got 1000000"),
    ],
)
def test_config_numbers_are_parsed_strictly(value, expected):
    if isinstance(expected, int):
        assert config_int(value, "config.json", "num_classes", "Fix it.") == expected
        return
    with pytest.raises(
        ConfigError, match=rf"config.json: num_classes must be an integer in \[1, 100000\], {expected}\. Fix it\."
    ):
        config_int(value, "config.json", "num_classes", "Fix it.")


def test_config_number_refuses_strings_booleans_and_non_finite_values():
    assert config_number(75.5, "c.json", "acc", "Fix.", low=0, high=100) == 75.5
    for bad in ("75.5", True, float("nan"), 101):
        with pytest.raises(ConfigError, match=r"c.json: acc must be a finite number in \[0, 100\], got .*Fix\."):
            config_number(bad, "c.json", "acc", "Fix.", low=0, high=100)


def test_torch_errors_become_weights_errors_naming_the_file():
    for err in (RuntimeError("CUDA out of memory\nmore"), MemoryError()):
        with (
            pytest.raises(
                WeightsError,
                match=r"head.pth: torch failed while building the probe \((RuntimeError: CUDA out of memory|MemoryError)",
            ),
            torch_errors("head.pth", "building the probe"),
        ):
            raise err
