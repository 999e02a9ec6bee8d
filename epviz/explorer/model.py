"""The Explorer's model: the user's choices, every cache, and the state they put on screen (no browser)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from epviz.analysis.ablation import uniform_effect
from epviz.analysis.baselines import localization_baselines
from epviz.analysis.intervals import LEVEL, N_BOOT
from epviz.analysis.meters import table_columns
from epviz.analysis.report import predictor_table
from epviz.backbones import Backbone, load_backbone, present_backbones, zoo
from epviz.data import DEFAULT_DATASET, ImageDataset, standard_splits, to_display
from epviz.probes import Probe, accepted_options, available, probe_specs
from epviz.setting import Setting
from epviz.tokens import extract_sets
from epviz.training import train_probe
from epviz.viz.maps import composite_overlay, group_colours, heat_overlay, query_colours, signed_overlay

__all__ = [
    "VIEWS",
    "ORDERS",
    "ALL_CLASSES",
    "EVIDENCE_FOR",
    "QUERY_CHOICES",
    "Selection",
    "ExplorerState",
    "ExplorerModel",
    "table_columns",
]

VIEWS = ("image only", "one query", "all queries", "query groups", "evidence")
EVIDENCE_FOR = ("predicted", "true", "predicted − true")
ORDERS = ("index", "most confident mistakes", "largest Δacc")
ALL_CLASSES = "all classes"
QUERY_CHOICES = (4, 8, 16, 32)
_SPLITS = ("train", "val", "test")
_USER_ERRORS = (ValueError, LookupError, OSError, RuntimeError, ArithmeticError, TypeError)

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Selection:
    """The user's choices.

    Attributes:
        backbone: Backbone name (zoo name or timm name).
        layer: Block index (0 = first block, -1 = last).
        probe: Label of a probe spec of the Explorer.
        queries: Number of queries, for probes that take ``num_queries`` (EP); ignored by others.
        view: One of :data:`VIEWS`.
        query: The highlighted predictor (query, head, map).
        groups: Number of query groups in the ``"query groups"`` view.
        order: One of :data:`ORDERS`.
        label: :data:`ALL_CLASSES` or the class name the images are filtered by (true label).
        position: Position of the image in the filtered, ordered list.
        opacity: Opacity of the overlay at its peak, in [0, 1].
        evidence: In the ``"evidence"`` view, the logit whose per-token contributions are shown: one of
            :data:`EVIDENCE_FOR` (the predicted class, the true class, or their difference).
        image: The name of an image added with :meth:`ExplorerModel.add_image` to show instead of the test
            split's ("": the test split's images, in `order`).
    """

    backbone: str = "tiny-mae"
    layer: int = -1
    probe: str = "ep"
    queries: int = 16
    view: str = "one query"
    query: int = 0
    groups: int = 4
    order: str = "index"
    label: str = ALL_CLASSES
    position: int = 0
    opacity: float = 0.6
    evidence: str = "predicted"
    image: str = ""

    def replace(self, **changes) -> Selection:
        """A copy with some fields changed; unknown field names raise a ValueError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"unknown explorer setting(s) {unknown}; the settings are: {fields}")
        return dataclasses.replace(self, **changes)


@dataclass
class ExplorerState:
    """Everything the Explorer shows for one selection (fields stay None where not computed).

    Attributes:
        selection: The selection this state shows.
        error: Why (part of) the selection cannot be shown, with the fix; "" when all is well.
        num_layers: Blocks of the backbone.
        layers: The blocks its token caches hold (every block unless ``extract`` names some).
        num_predictors: Attention predictors K of the probe (0 for cls, gap).
        takes_queries: Whether the probe takes the number of queries as an option.
        accuracy: Test top-1 of the probe.
        image_count: Images in the filtered, ordered list.
        image_index: Dataset index of the shown image.
        image: (H, W, 3) uint8.
        boxes: (k, 4) GT boxes (x0, y0, x1, y1) in pixels.
        true_label / predicted_label: Class names.
        confidence: Softmax probability of the predicted class.
        calibration_error: The probe's expected calibration error on the test split (15 confidence bins).
        bin_accuracy: Test top-1 of the images whose confidence falls in the shown image's bin: what its
            confidence means for this probe.
        knn_labels: What cosine k-NN (k = 20) on the train split's tokens predicts for the image, by feature
            (``"cls"``, ``"gap"``; :func:`epviz.evaluate.knn_predict`): a reader with nothing trained.
        highlighted: Predictors highlighted (the query, its group, or all).
        maps: (M, N) token maps shown: one row per query (one query / all queries) or group; in the
            ``"evidence"`` view one signed row per predictor, each token's exact contribution to the chosen
            logit through that predictor (:meth:`epviz.probes.Probe.evidence`), the overlay their sum.
        evidence: In the ``"evidence"`` view, the chosen logit (or logit difference) the contributions sum to.
        groups: Group of each predictor in the ``"query groups"`` view, (K,).
        overlay: (H, W, 4) RGBA overlay drawn over the image.
        table: One row per predictor: the columns of :func:`table_columns`, plus ``group`` and
            ``highlighted``.
        seconds: Time taken to compute this state.
    """

    selection: Selection
    error: str = ""
    num_layers: int | None = None
    layers: list[int] | None = None
    num_predictors: int | None = None
    takes_queries: bool = False
    accuracy: float | None = None
    image_count: int | None = None
    image_index: int | None = None
    image: np.ndarray | None = None
    boxes: np.ndarray | None = None
    true_label: str | None = None
    predicted_label: str | None = None
    confidence: float | None = None
    calibration_error: float | None = None
    bin_accuracy: float | None = None
    knn_labels: dict[str, str] = field(default_factory=dict)
    highlighted: list[int] = field(default_factory=list)
    maps: np.ndarray | None = None
    groups: np.ndarray | None = None
    overlay: np.ndarray | None = None
    evidence: float | None = None
    table: pd.DataFrame | None = None
    seconds: float = 0.0

    @property
    def correct(self) -> bool | None:
        """Whether the prediction is right (None when unknown)."""
        if self.true_label is None or self.predicted_label is None:
            return None
        return self.true_label == self.predicted_label

    def summary(self) -> dict:
        """The scalar facts of the state, for printing."""
        s = self.selection
        return {
            "backbone": s.backbone,
            "layer": s.layer,
            "probe": s.probe,
            "view": s.view,
            "query": s.query,
            "order": s.order,
            "label filter": s.label,
            "position": s.position,
            "image": self.image_index,
            "images in order": self.image_count,
            "true": self.true_label,
            "predicted": self.predicted_label,
            "confidence": None if self.confidence is None else round(self.confidence, 3),
            "calibration error": None if self.calibration_error is None else round(self.calibration_error, 3),
            "probe test top-1": None if self.accuracy is None else round(self.accuracy, 3),
            "predictors": self.num_predictors,
            "highlighted": self.highlighted,
            "evidence": None if self.evidence is None else round(self.evidence, 3),
            "error": self.error or None,
        }


@dataclass
class _ProbeData:
    """What is known about one trained probe on the test split."""

    probe: Probe
    probs: np.ndarray  # (n, C) softmax on the test images
    labels: np.ndarray  # (n,)
    reliability: pd.DataFrame  # the test split's reliability table (Predictions.reliability)
    table: pd.DataFrame | None = None
    overlap: np.ndarray | None = None
    groups: dict[int, np.ndarray] = field(default_factory=dict)
    effects: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    measured: dict[tuple[int, float], tuple[pd.DataFrame, pd.DataFrame]] = field(default_factory=dict)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)


class ExplorerModel:
    """Data, caches and the selection -> state logic of the Explorer (no widgets).

    Args:
        backbones: Backbone names or loaded backbones (default: the zoo backbones present).
        probes: Probe specs (see :func:`epviz.probes.probe_specs`; default: every registered
            probe, trained when first selected). In a mapping, a value may also be a trained
            :class:`~epviz.probes.Probe` (say a head read by :func:`epviz.training.load_reference_head`):
            it is shown as it is, never trained, on every backbone whose tokens fit it.
        trained: Trained probes for one backbone each, ``{(backbone, label): probe}``: on that backbone
            `label` shows the given probe instead of training one (`label` joins the probe choices).
        setting: Sizes and budget (default: :meth:`epviz.Setting.full`).
        dataset: Dataset spec of the standard sets (see :func:`epviz.data.load_split`).
        sets: ``{"train", "val", "test": dataset}`` (default: the standard sets of `dataset`); the images
            shown are those of ``test``, which needs GT boxes.
        fit_options: Overrides of the setting's probe budget.
        extract: :func:`epviz.extract_tokens` options of the token caches (default: every block, float16),
            e.g. ``{"layers": [-1], "dtype": "int8", "precision": "bf16"}`` to open the caches that
            ``epviz extract`` (or a torchrun run of it) wrote; the layer choice is then those blocks.
        seed: Seed of every probe.
        localization_images: Test images of the localization columns of the table (the costly measure).
        progress: Called as ``progress(fraction, message)`` during slow steps (extraction, training).
    """

    def __init__(
        self,
        backbones: Iterable[str | Backbone] | None = None,
        probes: str | Sequence[str] | Mapping[str, Mapping | Probe | None] | None = None,
        *,
        trained: Mapping[tuple[str, str], Probe] | None = None,
        setting: Setting | None = None,
        dataset: str = DEFAULT_DATASET,
        sets: Mapping | None = None,
        fit_options: Mapping | None = None,
        extract: Mapping[str, Any] | None = None,
        seed: int = 0,
        localization_images: int = 200,
        progress: Progress | None = None,
    ) -> None:
        self.setting = Setting.full() if setting is None else setting
        given = list(present_backbones(zoo.CORE) if backbones is None else backbones)
        if not given:
            raise ValueError("no backbones given: pass zoo names (tiny-mae, tiny-sup, tiny-random) or timm ViT names")
        self._backbones: dict[str, Backbone] = {b.name: b for b in given if isinstance(b, Backbone)}
        self.backbone_names = [b.name if isinstance(b, Backbone) else str(b) for b in given]
        self._given = _given_probes(probes, trained)
        strangers = sorted({str(b) for b, _ in self._given if b is not None} - set(self.backbone_names))
        if strangers:
            raise ValueError(
                f"trained= names backbone(s) {', '.join(strangers)}, which are not among this Explorer's backbones "
                f"({', '.join(self.backbone_names)}); add them to backbones="
            )
        specs = probes
        if isinstance(probes, Mapping):
            specs = {label: options for label, options in probes.items() if not isinstance(options, Probe)}
        trainable: dict[str, dict[str, Any]] = {}
        if specs is None or specs or not self._given:  # only given probes: nothing to train
            trainable = probe_specs(available() if specs is None else cast(Any, specs))
        self._given_only = {label for _, label in self._given} - set(trainable)
        self.specs = {**trainable, **{label: {"name": p.name} for (_, label), p in self._given.items() if label not in trainable}}
        self.fit_options = dict(fit_options or {})
        self.extract = dict(extract or {})
        self.seed = int(seed)
        self.localization_images = int(localization_images)
        self.progress = progress
        self.dataset = dataset
        self._sets = None if sets is None else dict(sets)
        self._caches: dict[str, dict] = {}
        self._tokens: dict[tuple[str, int], dict] = {}
        self._probes: dict[tuple, _ProbeData] = {}
        self._knn: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self._images: dict[str, torch.Tensor] = {}  # added images, (3, S, S) uint8
        self._own: dict[tuple[str, str, int], Any] = {}  # their tokens, per backbone and block
        self._uploads: Any = None  # the folder uploads are written to
        self.counts = {"extractions": 0, "trainings": 0, "tables": 0}

    # --- data ----------------------------------------------------------------------------

    @property
    def sets(self) -> dict:
        """The train / val / test datasets (built on first use)."""
        if self._sets is None:
            self._report(0.0, "building the standard datasets")
            self._sets = standard_splits(self.dataset, self.setting.sizes)
        missing = [s for s in _SPLITS if s not in self._sets]
        if missing:
            raise ValueError(f"the Explorer needs datasets for {', '.join(_SPLITS)}; sets= lacks {', '.join(missing)}")
        return self._sets

    @property
    def test(self):
        """The dataset whose images are shown."""
        return self.sets["test"]

    @property
    def class_names(self) -> list[str]:
        """Class names of the test set (its ``classes``, else the label numbers)."""
        if isinstance(self.test, ImageDataset):
            return [str(c) for c in self.test.classes]
        return [str(c) for c in range(int(np.max(_labels(self.test))) + 1)]

    def _report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(float(fraction), message)

    def backbone(self, name: str) -> Backbone:
        """The backbone called `name`, loaded once."""
        if name not in self._backbones:
            if name not in self.backbone_names:
                raise ValueError(
                    f"backbone {name!r} is not one of this Explorer's backbones ({', '.join(self.backbone_names)}); "
                    f"create the Explorer with backbones=[..., {name!r}] to add it"
                )
            self._report(0.02, f"loading backbone {name}")
            self._backbones[name] = load_backbone(name)
        return self._backbones[name]

    def layers(self, backbone: str) -> list[int]:
        """The blocks the token caches of `backbone` hold: those of ``extract["layers"]``, else every block."""
        chosen = self.extract.get("layers")
        return self.backbone(backbone).resolve_layers(chosen)

    def block(self, backbone: str, layer: int) -> int:
        """Block index in 0..depth-1 of `layer` (negative counts from the end)."""
        return self.backbone(backbone).resolve_layers(int(layer))[0]

    def tokens(self, backbone: str, layer: int) -> dict:
        """``{split: TokenSet}`` of one block; every block of a backbone is extracted once, on first use."""
        block = self.block(backbone, layer)
        if (backbone, block) not in self._tokens:
            caches = self._caches.get(backbone)
            if caches is None:
                caches = self._extract(backbone)
            self._tokens[backbone, block] = {split: caches[split].tokens(block, in_memory=True) for split in _SPLITS}
        return self._tokens[backbone, block]

    def _extract(self, backbone: str) -> dict:
        bb, sets, caches = self.backbone(backbone), self.sets, {}
        for i, split in enumerate(_SPLITS):
            self._report(
                0.05 + 0.6 * i / len(_SPLITS),
                f"tokens of {backbone}: {split} split, blocks {self.layers(backbone)}, "
                f"{len(sets[split]):,} images (extracted once, then read from disk)",
            )
            caches[split] = extract_sets([bb], {split: sets[split]}, progress=True, **self.extract)[bb.name][split]
            self.counts["extractions"] += int(not caches[split].hit)
        self._caches[backbone] = caches
        return caches

    # --- probes --------------------------------------------------------------------------

    def probe_options(self, label: str, queries: int | None = None) -> dict:
        """Build options of probe `label` (with ``name``), the number of queries applied where it is an option."""
        if label not in self.specs:
            raise ValueError(
                f"probe {label!r} is not one of this Explorer's probes ({', '.join(self.specs)}); "
                f"create the Explorer with probes=[..., {label!r}] to add it"
            )
        options = dict(self.specs[label])
        if queries is not None and _takes_queries(options["name"]):
            options["num_queries"] = int(queries)
        return options

    def given_probe(self, sel: Selection) -> Probe | None:
        """The trained probe given for the selection's backbone and probe label (``probes=`` / ``trained=``), else None.

        Raises:
            ValueError: The label names only probes given for other backbones.
        """
        probe = self._given.get((sel.backbone, sel.probe))
        if probe is None:
            probe = self._given.get((None, sel.probe))
        if probe is None and sel.probe in self._given_only:
            where = sorted(str(b) for b, label in self._given if label == sel.probe)
            raise ValueError(
                f"probe {sel.probe!r} was given trained for backbone(s) {', '.join(where)} only: choose one of "
                "them, or another probe"
            )
        return probe

    def probe_key(self, sel: Selection) -> tuple:
        """In-memory key of the probe of a selection: (backbone, block, probe label, options)."""
        block = self.block(sel.backbone, sel.layer)
        if self.given_probe(sel) is not None:
            return (sel.backbone, block, sel.probe, "given")
        options = self.probe_options(sel.probe, sel.queries)
        return (sel.backbone, block, sel.probe, json.dumps(options, sort_keys=True))

    def probe_data(self, sel: Selection) -> _ProbeData:
        """The trained probe of a selection and its test predictions (trained once per key; a given probe is never trained)."""
        key = self.probe_key(sel)
        given = self.given_probe(sel)
        if key not in self._probes and given is not None:
            self._check_given(sel, given)
            self._report(0.9, f"predicting the test images with the given probe {sel.probe}")
            self._probes[key] = self._predicted(given.eval(), self.tokens(sel.backbone, sel.layer)["test"])
        if key not in self._probes:
            tokens = self.tokens(sel.backbone, sel.layer)
            options = self.probe_options(sel.probe, sel.queries)
            name = options.pop("name")
            self._report(
                0.7,
                f"training probe {sel.probe} on {sel.backbone} block {key[1]} ({_options_text(options)}; "
                "loaded instead when it was trained before)",
            )
            result = train_probe(
                name,
                tokens["train"],
                tokens["val"],
                budget=self.setting.fit_options(**self.fit_options),
                seed=self.seed,
                **options,
            )
            self.counts["trainings"] += 1
            self._report(0.9, "predicting the test images")
            self._probes[key] = self._predicted(result.probe, tokens["test"])
        return self._probes[key]

    @staticmethod
    def _predicted(probe: Probe, test) -> _ProbeData:
        from epviz.evaluate import predict

        preds = predict(probe, test)
        return _ProbeData(probe=probe, probs=_softmax(preds.logits), labels=preds.labels, reliability=preds.reliability())

    def _check_given(self, sel: Selection, probe: Probe) -> None:
        """Refuse a given probe that cannot read the selection's tokens or name its test classes."""
        test = self.tokens(sel.backbone, sel.layer)["test"]
        block = self.block(sel.backbone, sel.layer)
        if probe.dim != test.dim:
            raise ValueError(
                f"probe {sel.probe!r} reads tokens of width {probe.dim}, but {sel.backbone} block {block} has width "
                f"{test.dim}: choose the backbone it was trained on"
            )
        if probe.needs_prefix and not test.num_prefix:
            raise ValueError(f"probe {sel.probe!r} reads the [CLS] token, and {sel.backbone} has none: choose another backbone")
        classes = len(self.class_names)
        if probe.num_classes != classes:
            raise ValueError(
                f"probe {sel.probe!r} predicts {probe.num_classes} classes, the test images have {classes}: show it "
                "with sets= of the dataset it was trained on"
            )

    def table(self, sel: Selection, data: _ProbeData) -> pd.DataFrame:
        """The registered meters' table columns (Δacc, entropy, localization, ...) of the selection's probe, computed once."""
        if data.table is None:
            self._report(0.95, f"measuring the {data.probe.num_predictors} predictors (Δacc, entropy, localization)")
            full = self._predictor_table(sel, data.probe, n_boot=0)  # interactive: measured() adds the intervals
            data.table = full[list(table_columns())].reset_index(drop=True)
            self.counts["tables"] += 1
        return data.table

    def _context(self, sel: Selection) -> dict[str, Any]:
        """The context columns of the selection's rows."""
        return dict(backbone=sel.backbone, layer=self.block(sel.backbone, sel.layer), probe=sel.probe, seed=self.seed)

    def _localization_index(self, sel: Selection) -> range:
        """The test images of the localization columns: the first ``localization_images``."""
        return range(min(len(self.tokens(sel.backbone, sel.layer)["test"]), self.localization_images))

    def _predictor_table(self, sel: Selection, probe: Probe, *, n_boot: int, level: float = LEVEL) -> pd.DataFrame:
        """:func:`~epviz.analysis.report.predictor_table` of `probe` on the selection's test tokens."""
        splits = self.tokens(sel.backbone, sel.layer)
        return predictor_table(
            probe,
            splits["test"],
            self.test,
            context=self._context(sel),
            localization_index=self._localization_index(sel),
            thresholds=self.setting.thresholds,
            train_tokens=splits.get("train"),  # the mean-map control's mean maps
            n_boot=n_boot,
            level=level,
        )

    def measured(self, sel: Selection, *, n_boot: int = N_BOOT, level: float = LEVEL) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The selection's probe measured as in notebook 02: every measure with its interval, beside chance.

        The interactive table (:meth:`table`) leaves the intervals out to stay fast; this computes them once
        per probe and (`n_boot`, `level`), on the same test and localization images, with the scores of the
        trivial maps on the same boxes.

        Args:
            sel: The selection (backbone, block, probe).
            n_boot: Bootstrap resamples of the test images.
            level: Coverage of the intervals.

        Returns:
            ``(table, chance)``: one row per predictor with the context columns, every registered meter's
            measures and their ``<column>_lo`` / ``<column>_hi`` intervals; and one row per trivial map
            (uniform, centred Gaussian prior, random maps of the probe's mean normalised entropy).

        Raises:
            ValueError: The probe has no attention predictors, or `n_boot` is below 1.
        """
        if int(n_boot) < 1:
            raise ValueError(f"n_boot must be at least 1 resample (the default is {N_BOOT}), got {n_boot}")
        data = self.probe_data(sel)
        if data.probe.num_predictors == 0:
            raise ValueError(
                f"probe {sel.probe} has no attention predictors, so there is nothing to measure: choose an attentive "
                "probe (ep, mhca, ...)"
            )
        key = (int(n_boot), float(level))
        if key not in data.measured:
            self._report(0.95, f"measuring the {data.probe.num_predictors} predictors with {n_boot} bootstrap resamples")
            table = self._predictor_table(sel, data.probe, n_boot=int(n_boot), level=float(level))
            chance = localization_baselines(
                self.test,
                self.tokens(sel.backbone, sel.layer)["test"].grid,
                target_entropy=float(table["entropy_norm"].mean()),
                seed=self.seed,
                index=self._localization_index(sel),
                thresholds=self.setting.thresholds,
                context=self._context(sel),
            )
            data.measured[key] = (table, chance)
            self._report(1.0, "measured")
        return data.measured[key]

    def group_labels(self, sel: Selection, data: _ProbeData) -> np.ndarray:
        """Group of each predictor for ``sel.groups`` groups (the overlap is measured once per probe)."""
        from epviz.analysis import group_queries, query_groups

        k = data.probe.num_predictors
        if not 1 <= sel.groups <= k:
            raise ValueError(
                f"{sel.groups} query groups asked for, but probe {sel.probe} has {k} predictors: choose between 1 and {k} groups"
            )
        if data.overlap is None:
            tokens = self.tokens(sel.backbone, sel.layer)["test"]
            data.overlap = query_groups(data.probe, tokens, 1, maps_index=[0]).overlap
        if sel.groups not in data.groups:
            data.groups[sel.groups] = group_queries(data.overlap, sel.groups)
        return data.groups[sel.groups]

    def uniform_effect(self, sel: Selection, data: _ProbeData, predictors: Sequence[int]) -> np.ndarray:
        """Per test image, the sort score of "largest Δacc" when `predictors` are made uniform (computed once).

        See :func:`epviz.analysis.uniform_effect`.
        """
        key = tuple(sorted(int(p) for p in predictors))
        if key not in data.effects:
            tokens = self.tokens(sel.backbone, sel.layer)["test"]
            data.effects[key] = uniform_effect(data.probe, tokens, key, probs=data.probs)
        return data.effects[key]

    # --- images --------------------------------------------------------------------------

    def image_order(self, sel: Selection, data: _ProbeData, highlighted: Sequence[int]) -> np.ndarray:
        """Dataset indices of the test images in the selected order, after the class filter."""
        if sel.order not in ORDERS:
            raise ValueError(f"unknown image order {sel.order!r}; choose one of: {', '.join(ORDERS)}")
        index = np.arange(len(data.labels))
        if sel.label != ALL_CLASSES:
            names = self.class_names
            if sel.label not in names:
                raise ValueError(f"unknown class {sel.label!r}; choose {ALL_CLASSES!r} or one of: {', '.join(names)}")
            index = index[data.labels == names.index(sel.label)]
        if sel.order == "most confident mistakes":
            index = index[data.preds[index] != data.labels[index]]
            index = index[np.argsort(-data.probs[index].max(1), kind="stable")]
        elif sel.order == "largest Δacc":
            if data.probe.num_predictors == 0:
                raise ValueError(
                    f"ordering by Δacc needs attention predictors, and probe {sel.probe} has none: "
                    "choose an attentive probe (ep, mhca, ...) or another image order"
                )
            effect = self.uniform_effect(sel, data, highlighted)
            index = index[np.argsort(-effect[index], kind="stable")]
        if len(index) == 0:
            what = "misclassified" if sel.order == "most confident mistakes" else "in this selection"
            raise ValueError(
                f"no test image is {what}"
                + (f" among class {sel.label}" if sel.label != ALL_CLASSES else "")
                + ": choose another class filter or image order"
            )
        return index

    def knn(self, backbone: str, layer: int) -> dict[str, np.ndarray]:
        """Cosine k-NN predictions (k = 20) for every test image, on [CLS] (where there is one) and on GAP, computed once."""
        from epviz.evaluate import knn_predictions

        key = (backbone, self.block(backbone, layer))
        if key not in self._knn:
            sets = self.tokens(backbone, layer)
            self._knn[key] = {f: found.preds for f, found in knn_predictions(sets["train"], sets["test"]).items()}
        return self._knn[key]

    def add_image(self, image: Any, name: str | None = None) -> str:
        """Add your own image to show (``Selection(image=name)``); returns its name.

        `image` is a file path, a PIL image, or the bytes of an image file (an upload). Every form is read
        by :func:`epviz.data.images.load_image`, with its checks (not an image, a decompression bomb, 16-bit or
        CMYK samples converted, an extreme aspect ratio), then resized (shorter side) and centre-cropped to
        the test images' size.
        """
        import tempfile
        from pathlib import Path

        from epviz.data.images import load_image
        from epviz.data.transforms import EvalTransform

        if self._uploads is None:
            self._uploads = Path(tempfile.mkdtemp(prefix="epviz-explorer-"))
        if isinstance(image, (bytes, bytearray, memoryview)):
            path = self._uploads / f"{len(self._images)}-{Path(name or 'upload').name}"
            path.write_bytes(bytes(image))
        elif hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image: stored losslessly (any mode), read as a file
            path = self._uploads / f"{len(self._images)}-{Path(name or 'image').stem}.tiff"
            image.save(path, format="TIFF")
        else:
            path = Path(image)
        pixels = load_image(path, convert=True)
        side = int(self.image_side)
        transform = EvalTransform(resize=side, crop=side)
        transform.check_size(int(pixels.shape[-2]), int(pixels.shape[-1]), what=str(name or path))
        key = name or Path(path).name
        self._images[key] = (transform.pipeline(pixels).clamp(0, 1) * 255).round().to(torch.uint8)
        self._own = {k: v for k, v in self._own.items() if k[0] != key}  # a name added again: its tokens anew
        return key

    @property
    def image_side(self) -> int:
        """The side of the test images (what an added image is cropped to)."""
        return int(_image(self.test, 0).shape[0])

    def _own_tokens(self, sel: Selection):
        """A one-image TokenSet of the added image `sel.image` at the selection's block (computed once)."""
        from epviz.runtime import resolve_device
        from epviz.tokens import TokenOrigin, TokenSet

        if sel.image not in self._images:
            added = ", ".join(self._images) or "none yet"
            raise ValueError(f"no added image named {sel.image!r} (added: {added}); add it with add_image(path)")
        block = self.block(sel.backbone, sel.layer)
        key = (sel.image, sel.backbone, block)
        if key not in self._own:
            test = self.tokens(sel.backbone, sel.layer)["test"]  # extracts the caches when they are not yet there
            norm = bool(self._caches[sel.backbone]["test"].meta["norm"])  # the added image's tokens as the cache's
            with torch.no_grad():
                ((patch, prefix),) = self.backbone(sel.backbone).block_tokens(
                    self._images[sel.image][None], [block], norm, resolve_device(None)
                )
            self._own[key] = TokenSet(
                patch=patch.float().cpu().numpy(),
                prefix=prefix.float().cpu().numpy() if test.prefix is not None else None,
                labels=np.zeros(1, np.int64),
                grid=test.grid,
                num_classes=test.num_classes,
                origin=TokenOrigin(backbone=sel.backbone, layer=block),
            )
        return self._own[key]

    def _fill_own_image(self, sel: Selection, out: ExplorerState, data: _ProbeData, tokens) -> None:
        """The added image: the probe's prediction and confidence, k-NN's answers; no true class, no boxes."""
        from epviz.evaluate import knn_predictions, predict

        names = self.class_names
        probs = _softmax(predict(data.probe, tokens).logits)[0]
        out.image_count, out.image_index = 1, None
        out.image = self._images[sel.image].permute(1, 2, 0).numpy()
        out.boxes = np.zeros((0, 4), np.float32)
        out.predicted_label = names[int(probs.argmax())]
        _fill_confidence(out, data, float(probs.max()))
        train = self.tokens(sel.backbone, sel.layer)["train"]
        out.knn_labels = {f: names[int(found.preds[0])] for f, found in knn_predictions(train, tokens).items()}

    # --- the state -----------------------------------------------------------------------

    def state(self, sel: Selection) -> ExplorerState:
        """What the Explorer shows for `sel`; a bad choice gives a state with its ``error`` set."""
        start = time.perf_counter()
        out = ExplorerState(selection=sel)
        try:
            self._fill(sel, out)
        except _USER_ERRORS as err:
            out.error = _message(err)
        out.seconds = time.perf_counter() - start
        return out

    def _fill(self, sel: Selection, out: ExplorerState) -> None:
        if sel.view not in VIEWS:
            raise ValueError(f"unknown view {sel.view!r}; choose one of: {', '.join(VIEWS)}")
        if not 0.0 <= float(sel.opacity) <= 1.0:
            raise ValueError(f"opacity must lie in [0, 1], got {sel.opacity}")
        out.num_layers = self.backbone(sel.backbone).depth
        out.layers = self.layers(sel.backbone)
        if self.block(sel.backbone, sel.layer) not in out.layers:
            raise ValueError(
                f"block {sel.layer} of {sel.backbone} is not in its token caches (blocks {out.layers}); "
                "choose one of those, or open the Explorer with extract={'layers': None} to extract every block"
            )
        out.takes_queries = self.given_probe(sel) is None and _takes_queries(self.probe_options(sel.probe)["name"])
        data = self.probe_data(sel)
        k = data.probe.num_predictors
        out.num_predictors = k
        out.accuracy = float((data.preds == data.labels).mean())
        groups = self.group_labels(sel, data) if sel.view == "query groups" and k else None
        highlighted = self._highlighted(sel, k, groups)
        out.highlighted = highlighted
        if sel.image:
            shown, image = self._own_tokens(sel), 0
            self._fill_own_image(sel, out, data, shown)
        else:
            order = self.image_order(sel, data, highlighted)
            out.image_count = len(order)
            if not 0 <= sel.position < len(order):
                raise ValueError(
                    f"image position {sel.position} is out of range: the ordering holds {len(order)} images "
                    f"(positions 0..{len(order) - 1})"
                )
            image = int(order[sel.position])
            shown = self.tokens(sel.backbone, sel.layer)["test"]
            self._fill_image(out, data, image)
            names = self.class_names
            out.knn_labels = {f: names[int(preds[image])] for f, preds in self.knn(sel.backbone, sel.layer).items()}
        if sel.view == "evidence":
            self._fill_evidence(sel, out, data, shown, image)
        elif sel.view != "image only" and k == 0:
            raise ValueError(
                f"probe {sel.probe} has no attention predictors (num_predictors == 0), so the "
                f"{sel.view!r} view has no map to show: choose an attentive probe (ep, mhca, ...) "
                "or the 'image only' view"
            )
        if k:
            self._fill_maps(sel, out, data, shown, image, groups)
            table = self.table(sel, data).copy()
            if groups is not None:
                table["group"] = groups[table["predictor"].to_numpy()]
            table["highlighted"] = table["predictor"].isin(highlighted)
            out.table = table

    def _highlighted(self, sel: Selection, k: int, groups: np.ndarray | None) -> list[int]:
        if k == 0:
            return []
        if not 0 <= sel.query < k:
            raise ValueError(f"query {sel.query} is out of range: probe {sel.probe} has {k} predictors (0..{k - 1})")
        if sel.view in ("all queries", "evidence"):
            return list(range(k))
        if groups is not None:
            return np.flatnonzero(groups == groups[sel.query]).tolist()
        return [int(sel.query)]

    def _fill_image(self, out: ExplorerState, data: _ProbeData, image: int) -> None:
        names = self.class_names
        out.image_index = image
        out.image = _image(self.test, image)
        out.boxes = _boxes(self.test, image)
        out.true_label = names[int(data.labels[image])]
        out.predicted_label = names[int(data.preds[image])]
        _fill_confidence(out, data, float(data.probs[image].max()))

    def _fill_evidence(self, sel: Selection, out: ExplorerState, data: _ProbeData, tokens, image: int) -> None:
        """The signed per-token contributions to the chosen logit (exact, :meth:`~epviz.probes.Probe.evidence`)."""
        if sel.evidence not in EVIDENCE_FOR:
            raise ValueError(f"unknown evidence {sel.evidence!r}; choose one of: {', '.join(EVIDENCE_FOR)}")
        probe = data.probe.eval()
        batch = tokens.batch(np.array([image]), device=probe.head.weight.device)
        try:
            with torch.no_grad():
                evidence = probe.evidence(batch.patch, batch.prefix)
        except NotImplementedError as err:
            raise ValueError(f"{err}: choose ep, ep_all, mhca, gap or cls for the evidence view") from None
        predicted = int(evidence.logits()[0].argmax())
        if sel.evidence != "predicted" and out.true_label is None:
            raise ValueError(f"your own image has no true class: choose evidence 'predicted' (not {sel.evidence!r})")
        true = self.class_names.index(out.true_label) if out.true_label is not None else predicted
        classes = {"predicted": [predicted], "true": [true], "predicted − true": [predicted, true]}[sel.evidence]
        sign = torch.tensor([1.0, -1.0][: len(classes)])
        per_class = evidence.patch[0, classes].cpu() * sign[:, None, None]  # (classes, K, N)
        out.maps = per_class.sum(0).numpy()
        other = (evidence.other[0, classes].cpu() * sign[:, None]).sum()
        bias = (evidence.bias[classes].cpu() * sign).sum()
        out.evidence = float(per_class.sum() + other + bias)
        grid = tokens.grid
        assert out.image is not None  # _fill_image ran first
        out.overlay = signed_overlay(out.maps.sum(0), grid, out.image.shape[:2], sel.opacity)

    def _fill_maps(
        self, sel: Selection, out: ExplorerState, data: _ProbeData, tokens, image: int, groups: np.ndarray | None
    ) -> None:
        from epviz.analysis.query_groups import group_maps

        if sel.view in ("image only", "evidence"):
            return
        from epviz.evaluate import collect_attention

        maps = collect_attention(data.probe, tokens, index=[image])[0]
        grid = tokens.grid
        assert out.image is not None  # _fill_image ran first
        size = out.image.shape[:2]
        if sel.view == "one query":
            out.maps = maps[[sel.query]]
            out.overlay = heat_overlay(out.maps[0], grid, size, sel.opacity)
            return
        if groups is not None:
            out.groups = groups
            out.maps = group_maps(maps[None], groups)[0]
            colours = group_colours(int(groups.max()) + 1)
        else:
            out.maps = maps
            colours = query_colours(len(maps))
        out.overlay = composite_overlay(out.maps, grid, size, colours, sel.opacity)


# --- small pure functions ----------------------------------------------------------------


def _fill_confidence(out: ExplorerState, data: _ProbeData, confidence: float) -> None:
    """The shown prediction's confidence, the probe's ECE, and how often test images as confident are right."""
    bins = data.reliability
    out.confidence = confidence
    out.calibration_error = float(bins["gap"].sum())
    out.bin_accuracy = float(bins["accuracy"].iloc[min(int(confidence * len(bins)), len(bins) - 1)])


def _takes_queries(name: str) -> bool:
    return "num_queries" in accepted_options(name)


def _given_probes(probes: object, trained: Mapping | None) -> dict[tuple[str | None, str], Probe]:
    """``{(backbone or None for every backbone, label): probe}`` from the trained probes in `probes` and `trained`."""
    given: dict[tuple[str | None, str], Probe] = {}
    if isinstance(probes, Mapping):
        given.update({(None, str(label)): p for label, p in probes.items() if isinstance(p, Probe)})
    for key, probe in (trained or {}).items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            raise ValueError(f"trained= is keyed by (backbone, label) pairs of strings, got the key {key!r}")
        if not isinstance(probe, Probe):
            raise TypeError(f"trained[{key!r}] must be a trained Probe (e.g. from epviz.load_probe), got {type(probe).__name__}")
        given[key] = probe
    return given


def _options_text(options: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "default options"


def _message(err: BaseException) -> str:
    text = str(err).strip().strip("'\"") or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _labels(dataset) -> np.ndarray:
    if isinstance(dataset, ImageDataset):
        return np.asarray(dataset.labels, dtype=np.int64)
    return np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


def _image(dataset, index: int) -> np.ndarray:
    """(H, W, 3) uint8 image `index` of a dataset (its ``display_image``, else ``dataset[index][0]``)."""
    if isinstance(dataset, ImageDataset):
        return dataset.display_image(index)
    return to_display(dataset[index][0])


def _boxes(dataset, index: int) -> np.ndarray:
    from epviz.analysis.boxes import box_source

    return np.asarray(box_source(dataset)(index), dtype=np.float32).reshape(-1, 4)


# --- rendering ---------------------------------------------------------------------------
