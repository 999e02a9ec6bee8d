"""A per-predictor measure defined in one file outside epviz: importing it registers it everywhere.

"peak_mass" then appears in the predictor table, the figures label its axis, and the Explorer's
table shows it (tests/analysis/test_plugin.py imports and unregisters it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from epviz.analysis import Meter, MeterBatch, register_meter
from epviz.probes import Probe
from epviz.tokens import TokenSet

__all__ = ["PEAK_MASS_LABEL", "PeakMass"]

PEAK_MASS_LABEL = "largest token weight of the map"


@register_meter("peak_mass")
class PeakMass(Meter):
    """Mean over images of each predictor's largest token weight (1 = all mass on one token, 1/N = uniform)."""

    columns = {"peak_mass": PEAK_MASS_LABEL}
    table_columns = ("peak_mass",)

    def start(self, probe: Probe, tokens: TokenSet, dataset=None) -> None:
        self.total, self.n = np.zeros(probe.num_predictors), 0

    def update(self, maps: torch.Tensor, batch: MeterBatch) -> None:
        self.total += (maps / maps.sum(-1, keepdim=True)).amax(-1).sum(0).double().numpy()
        self.n += len(maps)

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({"predictor": np.arange(len(self.total)), "peak_mass": self.total / self.n})
