"""The set-up every notebook shares: backbones (with the random-init control), datasets, tokens, figures.

Each notebook's parameter cell names its backbones, control, dataset and block; one call then
builds everything the analyses read::

    study = epviz.open_study(BACKBONES, control=CONTROL, dataset=DATASET, layer=LAYER)
    study.tokens["tiny-mae"]["train"]     # TokenSet of the chosen block
    study.caches["tiny-mae"]["val"]       # TokenCache of every block (layer sweeps)
    study.figures                         # ../figures (../figures/fast in fast mode)

Tokens of every block are extracted once per backbone and split; later notebooks find them in
the token cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epviz.backbones import present_backbones
from epviz.data import DEFAULT_DATASET, ImageDataset, standard_splits
from epviz.provenance import note
from epviz.setting import SPLITS, Setting
from epviz.tokens import TokenCache, TokenSet, extract_sets, layer_tokens

__all__ = ["Study", "open_study"]


@dataclass
class Study:
    """What a notebook works on.

    Attributes:
        setting: Sizes, budgets, thresholds and probe set.
        backbones: The backbones that can be loaded (zoo models without weights are left out).
        control: The random-init control (None: none).
        dataset: The dataset spec.
        layer: The block the last-block analyses read.
        sets: The datasets per split.
        caches: ``{backbone: {split: TokenCache}}`` of every block.
        tokens: ``{backbone: {split: TokenSet}}`` of `layer`.
        figures: Folder of the figures (PNG + CSV).
    """

    setting: Setting
    backbones: list[str]
    control: str | None
    dataset: str
    layer: int
    sets: dict[str, ImageDataset]
    caches: dict[str, dict[str, TokenCache]] = field(default_factory=dict)
    tokens: dict[str, dict[str, TokenSet]] = field(default_factory=dict)
    figures: Path = Path("../figures")

    @property
    def budget(self) -> dict[str, Any]:
        """The setting's probe budget (:func:`epviz.fit` keyword arguments)."""
        return self.setting.fit_options()

    @property
    def trained(self) -> list[str]:
        """The backbones other than the control."""
        return [b for b in self.backbones if b != self.control]

    def describe(self) -> dict[str, Any]:
        """A summary to print at the top of a notebook."""
        return {
            "setting": self.setting.name,
            "backbones": self.backbones,
            "control": self.control,
            "dataset": self.dataset,
            "layer": self.layer,
            "images": {split: len(ds) for split, ds in self.sets.items()},
            "budget": self.budget,
            "figures": str(self.figures),
        }


def open_study(
    backbones: Sequence[str],
    *,
    control: str | None = "tiny-random",
    dataset: str = DEFAULT_DATASET,
    layer: int = -1,
    splits: Sequence[str] = SPLITS,
    setting: Setting | None = None,
    figures: str | Path = "../figures",
    tokens: bool = True,
    extract: Mapping[str, Any] | None = None,
) -> Study:
    """Build a notebook's study: present backbones, the standard datasets, their tokens, the figures folder.

    Args:
        backbones: Zoo names, presets ("mae-vit-b"), timm ViT names or "<name>:random".
        control: The random-init control; it must be among `backbones` (None: no control).
        dataset: Dataset spec of any registered kind (see :func:`epviz.data.load_split`, :func:`epviz.data.dataset_kinds`).
        layer: Block of :attr:`Study.tokens` (0 = first, -1 = last).
        splits: Which standard splits to build.
        setting: Sizes and budgets (default :meth:`Setting.full`).
        figures: Root folder of the figures; fast mode writes under ``<figures>/fast``.
        tokens: Extract (or read) the tokens now.
        extract: :func:`epviz.extract_tokens` options of the caches (default: every block, float16, fp32
            compute), e.g. ``{"layers": [-1], "dtype": "int8", "precision": "bf16"}`` to open the caches
            that ``epviz extract --layers -1 --dtype int8 --precision bf16`` (or a torchrun run of it) wrote.

    Raises:
        ValueError: The control is not among the present backbones.
    """
    setting = Setting.full() if setting is None else setting
    present = present_backbones(backbones)
    if control is not None and control not in present:
        raise ValueError(
            f"the random-init control {control!r} must be among the backbones {present}: the control stands "
            "beside every trained backbone (control=None runs without one)"
        )
    sets = standard_splits(dataset, setting.sizes, splits)
    folder = Path(figures) / ("fast" if setting.is_fast else "")
    study = Study(setting=setting, backbones=present, control=control, dataset=dataset, layer=layer, sets=sets, figures=folder)
    note(dataset=dataset)  # the sidecars of the figures saved afterwards name the dataset and the token caches
    if tokens:
        study.caches = extract_sets(present, sets, **dict(extract or {}))
        study.tokens = layer_tokens(study.caches, layer)
        note(tokens=study.tokens)
    return study
