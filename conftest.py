"""Notebooks run under nbval in fast mode unless EPVIZ_FAST is set explicitly; tests are marked by what they run."""

import os

import pytest

os.environ.setdefault("EPVIZ_FAST", "1")

_MARKED_PATHS = {
    "/notebooks/": ("notebook", "slow"),
    "/tests/explorer/test_browser.py": ("browser", "slow"),
    "/tests/test_scripts.py": ("slow",),
}


def pytest_collection_modifyitems(config, items):
    """Mark whole files by what they run: notebooks (nbval and nbclient), the browser, the zoo scripts."""
    for item in items:
        path = item.path.as_posix()
        for part, marks in _MARKED_PATHS.items():
            if part in path:
                for mark in marks:
                    item.add_marker(getattr(pytest.mark, mark))
