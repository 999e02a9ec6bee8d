"""Notebooks run under nbval in fast mode unless EPVIZ_FAST is set explicitly."""

import os

os.environ.setdefault("EPVIZ_FAST", "1")
