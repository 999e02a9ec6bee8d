"""The conda environment and pyproject.toml list the same dependencies; CI calls make test."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}


def _name(requirement: str) -> tuple[str, str]:
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", requirement)
    return match.group(1).lower().replace("_", "-"), match.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group if not r.startswith("epviz[")]
    wanted = dict(_name(r) for r in project["dependencies"] + extras)
    listed = {}
    text = (ROOT / "environment.yml").read_text()
    section = text[text.index("dependencies:") :]
    for line in section.splitlines():
        m = re.match(r"\s+- ([A-Za-z][^#:]*)$", line)
        if m:
            name, spec = _name(m.group(1))
            listed[CONDA_NAMES.get(name, name)] = spec
    listed.pop("python", None)
    listed.pop("pip", None)
    assert listed == wanted


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make figures" in (ROOT / "README.md").read_text()


def test_one_source_for_the_version_and_a_typed_package():
    import epviz

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "epviz._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", epviz.__version__)
    assert (ROOT / "epviz" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["epviz"]


def test_notebook_tooling_is_an_extra_not_a_runtime_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r)[0] for r in project["dependencies"]}
    assert not runtime & {"jupyterlab", "nbval", "nbclient", "nbformat", "ipykernel", "pytest"}
    assert {_name(r)[0] for r in project["optional-dependencies"]["notebooks"]} >= {"nbclient", "nbformat", "ipykernel"}
