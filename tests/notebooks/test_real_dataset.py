"""Notebook 01 end to end on an ImageNet-style folder with a random-init timm test_vit (no download)."""

import json
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from tests.data.formats import write_imagenet

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "01_probe_zoo_efficiency.ipynb"


@pytest.mark.timeout(600)
def test_probe_zoo_notebook_runs_on_an_imagenet_folder(tmp_path, monkeypatch):
    root = tmp_path / "imagenet"
    write_imagenet(root, train_per_class=8, val_per_class=3, layout="flat", boxes="xml", size=(64, 48))
    figures = tmp_path / "figures"
    for key, value in {"EPVIZ_CACHE": str(tmp_path / "cache"), "EPVIZ_DEVICE": "cpu",
                       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, 4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = "\n".join([
        "import epviz",
        "SETTING = epviz.Setting.fast()",
        "FAST = True",
        'EXTRACT = {"layers": [-1], "dtype": "int8"}',  # the notebook on caches of one block, int8
        'BACKBONES = ("test_vit:random",)',
        "CONTROL = None",
        f'DATASET = "imagenet:{root}"',
        "LAYER = -1",
        'PROBES = ("cls", "gap", "ep16", "mhca", "cbam")',
        "SEED = 0",
        "SEEDS = (0, 1)",
        'SEEDS_FOR = ("cls", "ep16")',
        f'FIGURES = "{figures}"',
    ])
    nb.cells.append(nbformat.v4.new_code_cell(
        f'results.to_csv("{tmp_path / "results.csv"}", index=False)\n'
        f'import json; json.dump({{k: len(v) for k, v in sets.items()}}, open("{tmp_path / "sizes.json"}", "w"))'
    ))
    NotebookClient(nb, timeout=500, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    results = pd.read_csv(tmp_path / "results.csv")
    assert set(results["probe"]) == {"cls", "gap", "ep16", "mhca", "cbam"} and set(results["backbone"]) == {"test_vit:random"}
    assert results["test_acc"].between(0, 1).all()
    assert results.set_index("probe")["seeds"].to_dict() == {"cls": 2, "gap": 1, "ep16": 2, "mhca": 1, "cbam": 1}
    assert (tmp_path / "sizes.json").read_text() == '{"train": 21, "val": 3, "test": 9}'
    assert any((figures / "fast").glob("01_accuracy_vs_params*.png")), "the figures were written where FIGURES points"
    caches = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file()]
    assert caches and all(json.loads((p / "meta.json").read_text())["dtype"] == "int8" for p in caches), "EXTRACT reached the caches"
