import json

import pytest

from epviz import cli


def test_report_embeds_every_figure(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (tmp_path / "a.csv").write_text("x\n1\n")
    report = cli.write_report(tmp_path, [{"notebook": "00_quickstart.ipynb", "seconds": 1.5}])
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert "a.csv" in text and "00_quickstart.ipynb" in text


def test_extract_command_reports_a_cache(tmp_path, capsys):
    args = ["extract", "--backbone", "tiny-random", "--size", "12", "--layers", "0", "-1", "--cache-dir", str(tmp_path)]
    cli.main(args)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["layers"] == [0, 5] and first["images"] == 12 and not first["hit"]
    cli.main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hit"]


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def _notebook(path, source: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_a_failing_notebook_does_not_stop_the_others(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    _notebook(tmp_path / "notebooks" / "01_bad.ipynb", "raise ValueError('no such backbone')")
    _notebook(tmp_path / "notebooks" / "02_good.ipynb", "open('ran.txt', 'w').write('yes')")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="1 notebook\\(s\\) failed: 01_bad.ipynb"):
        cli.main(["reproduce", "--fast"])
    assert (tmp_path / "notebooks" / "ran.txt").read_text() == "yes"
    report = (tmp_path / "figures" / "fast" / "report.html").read_text()
    assert "ValueError: no such backbone" in report
    assert (tmp_path / "figures" / "fast" / "notebooks" / "01_bad.ipynb").is_file()
