"""The conda environment and pyproject.toml list the same dependencies; CI calls make test."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}


def _name(requirement: str) -> tuple[str, str]:
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", requirement)
    return match.group(1).lower().replace("_", "-"), match.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"])
    listed = {}
    text = (ROOT / "environment.yml").read_text()
    section = text[text.index("dependencies:"):]
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
