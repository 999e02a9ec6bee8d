"""Shared helpers of the probe families, seen through the probes: head counts are validated with the fix named."""

import pytest

import epviz.probes as probes


@pytest.mark.parametrize("name", ["mhca", "aim", "cae", "jepa", "siglip", "cait", "dinovit", "clip", "esimpool", "simpool"])
def test_heads_option_is_validated(name):
    with pytest.raises(
        ValueError, match=r"heads=5 must divide the token width D=64; valid choices include \[1, 2, 4, 8, 16, 32, 64\]"
    ):
        probes.build(name, 64, 5, heads=5)
