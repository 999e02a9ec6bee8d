"""The notebook runner behind `epviz reproduce`: cell progress, estimates and the report."""

from epviz import reproduce


def test_report_embeds_every_figure(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (tmp_path / "a.csv").write_text("x\n1\n")
    report = reproduce.write_report(tmp_path, [{"notebook": "00_quickstart.ipynb", "seconds": 1.5}])
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert "a.csv" in text and "00_quickstart.ipynb" in text


class _Cell(dict):
    def __init__(self, source, cell_type="code"):
        super().__init__(source=source, cell_type=cell_type)
        self.source, self.cell_type = source, cell_type


def test_cell_progress_prints_cells_and_estimates_from_the_previous_run():
    import io
    import types

    clock = [0.0]
    nb = types.SimpleNamespace(cells=[_Cell("# intro", "markdown"), _Cell("import x"), _Cell("train()  # long"), _Cell("")])
    out = io.StringIO()
    first = reproduce.CellProgress("01_zoo", nb, None, out=out, clock=lambda: clock[0])
    for index, seconds in ((1, 0.5), (2, 90.0)):
        first.on_cell_execute(cell=nb.cells[index], cell_index=index)
        clock[0] += seconds
        first.on_cell_executed(cell=nb.cells[index], cell_index=index, execute_reply={"content": {"status": "ok"}})
    lines = out.getvalue().splitlines()
    assert lines[0] == "[01_zoo cell 1/2] import x - at 0.0 s (first run)"
    assert lines[1] == "[01_zoo cell 1/2] done in 0.5 s; notebook at 0.5 s"
    assert lines[2].startswith("[01_zoo cell 2/2] train()  # long - at 0.5 s (first run)")
    assert lines[3] == "[01_zoo cell 2/2] done in 1 min 30 s; notebook at 1 min 30 s"
    assert first.cells["2"]["seconds"] == 90.0 and set(first.cells) == {"1", "2"}

    out = io.StringIO()
    clock[0] = 0.0
    second = reproduce.CellProgress("01_zoo", nb, {"cells": first.cells}, out=out, clock=lambda: clock[0])
    second.on_cell_execute(cell=nb.cells[1], cell_index=1)
    second.on_cell_executed(cell=nb.cells[1], cell_index=1)
    second.on_cell_execute(cell=nb.cells[2], cell_index=2)
    clock[0] = 30.0
    lines = out.getvalue().splitlines()
    assert lines[0] == "[01_zoo cell 1/2] import x - at 0.0 s", "a short cell gets no estimate"
    assert lines[2] == "[01_zoo cell 2/2] train()  # long - at 0.0 s (previous run 1 min 30 s)"
    assert "the cell has changed since" in second._estimate(2, "train(epochs=9)")


def test_report_links_every_figures_sidecar_and_lists_notebooks(tmp_path):
    import matplotlib.pyplot as plt

    from epviz.viz import save_figure

    fig, ax = plt.subplots()
    save_figure(fig, None, "01_points", tmp_path, provenance={"seeds": [0, 1], "images": [3, 4]})
    plt.close(fig)
    (tmp_path / "02_other.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    timings = [
        {"notebook": "01_zoo.ipynb", "seconds": 125.0, "status": "ok", "figures": ["01_points.png"]},
        {"notebook": "02_maps.ipynb", "seconds": 3.0, "status": "failed", "error": "ValueError: bad"},
    ]
    text = reproduce.write_report(tmp_path, timings).read_text()
    assert "provenance: <a href='01_points.json'>01_points.json</a>" in text and "seeds [0, 1]" in text
    assert "images [3, 4]" in text
    row = next(line for line in text.split("<tr>") if "01_zoo.ipynb" in line)
    assert "2 min 05 s" in row and "<a href='#fig-01_points'>01_points</a> (<a href='01_points.json'>provenance</a>)" in row
    failed = next(line for line in text.split("<tr>") if "02_maps.ipynb" in line)
    assert "ValueError: bad" in failed and "#fig-02_other" in failed, "figures named after the notebook's number"
    assert "02_other.json" not in text, "no sidecar, no link"


def test_fast_mode_is_set_in_the_parameters_cell_of_every_notebook():
    """Every notebook reads FAST from its parameters cell; set_parameters rewrites that line and only that line."""
    import nbformat
    import pytest

    from epviz.errors import ConfigError

    source = "import epviz\nFAST = False          # True: small sizes\nSIZE = 500 if FAST else 4_000\nFAST_TOO = 1\n"
    changed = reproduce.set_parameters(source, FAST=True, SIZE=7)
    assert changed == "import epviz\nFAST = True          # True: small sizes\nSIZE = 7\nFAST_TOO = 1\n"
    with pytest.raises(ConfigError, match="assigns no 'EPOCHS'"):
        reproduce.set_parameters(source, EPOCHS=3)
    notebooks = sorted((reproduce.repo_root() / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 8
    for path in notebooks:
        cell = reproduce.parameters_cell(nbformat.read(path, as_version=4))
        namespace: dict = {}
        lines = [line for line in reproduce.set_parameters(cell.source, FAST=True).splitlines() if line.startswith("FAST")]
        exec("\n".join(lines), namespace)  # noqa: S102 - the notebook's own FAST line
        assert namespace["FAST"] is True, path.name
    with pytest.raises(ConfigError, match="no cell tagged 'parameters'"):
        reproduce.parameters_cell(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]))
