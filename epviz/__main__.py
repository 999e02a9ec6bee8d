"""``python -m epviz``: the ``epviz`` command (also ``torchrun -m epviz extract ...``)."""

from epviz.cli import main

main()
