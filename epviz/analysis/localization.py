"""Localization quality of attention maps against ground-truth masks and boxes (Fig. 4, x axis).

Measures per attention predictor, over a dataset whose images carry GT boxes
(``(x0, y0, x1, y1)`` pixels, exclusive ``x1, y1``; an image may have several boxes) and,
where it has them, object masks. Definitions (ours where the paper's could not be checked):

* **Lift** (the lead measure; it sees where the map's *mass* is, not only its order). With m
  the share of the map's mass on the object and c the object's share of the image (the mass
  of the uniform map), lift = (m - c) / (1 - c), per image, averaged over images: 0 for a map
  that is uniform or places its mass by chance, 1 for all mass on the object, negative for
  mass kept off it. ``mask_lift`` uses the object mask on the token grid (token (r, c) counts
  by the fraction of its pixels on the mask), ``mask_lift_px`` the map upsampled bilinearly to
  pixels (clamped at 0, renormalised) against the pixel mask, ``box_lift`` the union of the
  GT boxes on the token grid (``inbox_mass`` against ``chance_mass``; 0 on an image the boxes
  cover entirely). ``mask_mass`` and
  ``mask_chance`` are m and c of the mask on the token grid. MaxBoxAccV2 and the pointing
  game do not change under any monotone transform of a map: an untrained head whose maps are
  uniform to four decimals can score high on them because the tokens carry the object's
  brightness; lift reads such maps as 0.

* **MaxBoxAccV2** (Choe et al., CVPR 2020). Each map, a distribution over the N patch
  tokens, is upsampled from the patch grid to the image size (``align_corners=False``) and
  min-max normalised to [0, 1]. A map whose token values are all equal is constant: this is
  tested on the token grid, before upsampling; a constant map becomes all zeros and never
  yields a box at any threshold (testing after upsampling would stretch the rounding ripple
  of the interpolation to [0, 1] and box it). The upsampling runs in float64 and its result
  is rounded to float32, so a flat stretch of tokens stays exactly flat (a flat background
  at the minimum is exactly 0, never foreground at tau = 0); scores and thresholds are
  compared in float64. For every threshold tau in ``thresholds`` (default 0, 0.01, ...,
  0.99), every 8-connected region of pixels with value ``> tau`` is boxed (tightest box,
  holes are not boxed separately). An image is correct at (tau, delta) when the best IoU of
  any of its region boxes with any of its GT boxes is ``>= delta``. Accuracy per
  (tau, delta) is the fraction of correct images over the whole dataset; the best tau is
  chosen per delta at the dataset level (never per image); MaxBoxAccV2 is the mean of
  those best accuracies over delta in ``deltas`` (default 0.3, 0.5, 0.7).

  Two conventions (``convention=``), which differ only in the upsampling and the box:

  - ``"epviz"`` (default, ours): bilinear upsampling; exclusive pixel boxes, a region
    covering pixel columns a..b has x0 = a, x1 = b + 1, and IoU uses the areas
    ``(x1 - x0) * (y1 - y0)`` of region and GT boxes alike, so the tightest box around a
    region scores IoU 1 against an equal GT box.
  - ``"wsol"``: the conventions of the official wsolevaluation code
    (clovaai/wsolevaluation): bicubic upsampling (its ``cv2.INTER_CUBIC``; here torch's
    bicubic, a = -0.75, border pixels replicated); region boxes ``x0 = a``,
    ``x1 = min(a + w, W - 1)`` (``x + w`` of ``cv2.boundingRect``, clipped to the last
    pixel); inclusive IoU, areas ``(x1 - x0 + 1) * (y1 - y0 + 1)`` for region and GT boxes
    alike (the GT numbers are used as given). A region box is thus one pixel larger than the
    tightest box on each axis, except where it touches the right or bottom edge. Everything
    else is shared: wsolevaluation's 8-bit quantisation of the scores
    (``uint8(255 s) > int(255 tau)``) and its boxing of hole contours (``RETR_TREE``) are
    not reproduced.
* **In-box mass**: the attention mass inside the GT boxes, computed on the token grid.
  Patch token (r, c) covers the image rectangle ``[c W/cols, (c+1) W/cols) x
  [r H/rows, (r+1) H/rows)``; its weight counts by the fraction of that area inside the
  union of the image's GT boxes (boxes rasterised to pixels, edge pixels of non-integer
  boxes counted fractionally, union = pixel-wise max). The map is renormalised to sum 1
  first. ``chance_mass`` is the area fraction of the image covered by the boxes, which is
  exactly the in-box mass of the uniform map.
* **Pointing game**: an image is a hit when the centre of the map's argmax patch (first one
  on ties) lies inside a GT box (``x0 <= x < x1`` and ``y0 <= y < y1``).

Everything streams over the dataset in batches: only one batch of maps is upsampled at a
time, and the thresholds of a group of maps are labelled together (one
``scipy.ndimage.label`` call over a stack of thresholded maps whose planes are not
connected to each other).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from itertools import chain
from operator import attrgetter

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from epviz.analysis._common import context_columns, frame, require_predictors
from epviz.analysis.boxes import box_source, mask_source
from epviz.analysis.measure import measure
from epviz.analysis.meters import Meter, MeterBatch, register_meter
from epviz.checks import check_array, check_int, check_number, check_sequence
from epviz.data import GroundTruthBoxes, ImageDataset
from epviz.errors import ConfigError
from epviz.probes import Probe
from epviz.setting import THRESHOLDS
from epviz.tokens import TokenSet

__all__ = [
    "CONVENTIONS",
    "DELTAS",
    "THRESHOLDS",
    "Localization",
    "LocalizationMeter",
    "box_source",
    "localization",
    "localization_from_maps",
]

DELTAS = (0.3, 0.5, 0.7)
CONVENTIONS = ("epviz", "wsol")  # MaxBoxAccV2 conventions, see the module docstring
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True  # 8-connectivity inside a plane, no connection across planes
_VOXEL_BUDGET = 1 << 20  # thresholded pixels labelled per ndimage.label call


_POSITIVE_INT = partial(check_int, low=1)


def _as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, numbers.Real):
        side = check_int("image_size", image_size, 1)
        return side, side
    h, w = check_sequence("image_size", image_size, _POSITIVE_INT, length=2, example="(224, 224)")
    return h, w


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
    rows, cols = check_sequence("grid", grid, _POSITIVE_INT, length=2, example="(14, 14)")
    return rows, cols


def _check_thresholds(thresholds: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """MaxBoxAccV2 thresholds: strictly increasing fractions in [0, 1] (the first best tau is then the smallest)."""
    if thresholds is None:
        return THRESHOLDS.astype(np.float64)
    return np.array(check_sequence("thresholds", thresholds, partial(check_number, low=0, high=1), increasing=True))


def _check_deltas(deltas: Sequence[float] | np.ndarray) -> np.ndarray:
    """IoU thresholds in (0, 1], each listed once."""
    return np.array(check_sequence("deltas", deltas, partial(check_number, low=0, high=1, open_low=True), unique=True))


def _delta_names(deltas: np.ndarray) -> list[str]:
    """The summary's column names of the deltas (``iou50``), refused where two would share one and a value be lost."""
    names = [f"iou{round(d * 100):d}" for d in deltas]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"deltas={deltas.tolist()} name the same column twice ({names}): use IoU thresholds a whole percent apart"
        )
    return names


def _as_maps(maps) -> np.ndarray:
    """(n, K, N) or (n, N) maps as a float32 array, with finite, non-negative values that fit float32."""
    array = check_array("maps", maps)
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise ConfigError(
            f"maps must be (images, predictors, tokens), or (images, tokens) for one predictor; got shape {array.shape}"
        )
    bad = ~np.isfinite(array) | (array < 0) | (array > np.finfo(np.float32).max)
    if bad.any():
        first = tuple(np.argwhere(bad)[0])
        where = f"image {first[0]}" + (f", predictor {first[1]}" if array.ndim == 3 else "")
        raise ConfigError(
            f"the map of {where} holds {float(array[first])}: maps must be finite, non-negative "
            "and within float32's range (scale them down: every map is normalised anyway)"
        )
    return array.astype(np.float32)


def check_boxes(boxes, image: int, height: int, width: int) -> np.ndarray:
    """Validate one image's GT boxes and return them as a float64 (k, 4) array.

    Raises:
        ConfigError: No box, a malformed array, a box outside the image or with zero area.
    """
    b = check_array(f"the GT boxes of image {image}", boxes)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ConfigError(f"GT boxes of image {image} must be (k, 4) xyxy pixels, got shape {b.shape}")
    if len(b) == 0:
        raise ConfigError(f"image {image} has no GT box; every image needs at least one")
    for box in b:
        x0, y0, x1, y1 = box
        shown = [float(v) for v in box]
        if not np.isfinite(box).all():
            raise ConfigError(f"GT box {shown} of image {image} is not finite")
        if x1 <= x0 or y1 <= y0:
            raise ConfigError(
                f"GT box {shown} of image {image} has zero area: boxes are (x0, y0, x1, y1) pixels "
                "with exclusive x1, y1, so x1 > x0 and y1 > y0"
            )
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ConfigError(
                f"GT box {shown} of image {image} lies outside the {width}x{height} (width x height) image; "
                "boxes are (x0, y0, x1, y1) pixels with exclusive x1, y1"
            )
    return b


def _check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"convention must be one of {list(CONVENTIONS)} (epviz: bilinear upsampling, exclusive boxes; "
            f"wsol: wsolevaluation's bicubic upsampling, x + w boxes with inclusive IoU), got {convention!r}"
        )
    return convention


def _cell_weights(cells: int, length: int) -> np.ndarray:
    """(cells, length): fraction of each cell's extent covered by each pixel of the axis."""
    edges = np.arange(cells + 1) * (length / cells)
    px = np.arange(length)
    lo = np.maximum(px[None, :], edges[:-1, None])
    hi = np.minimum(px[None, :] + 1, edges[1:, None])
    return np.clip(hi - lo, 0, None) / (length / cells)


def _axis_cover(lo: np.ndarray, hi: np.ndarray, length: int) -> np.ndarray:
    """(k, length): fraction of each pixel of the axis inside [lo, hi) for each of k intervals."""
    px = np.arange(length)
    return np.clip(np.minimum(px + 1, hi[:, None]) - np.maximum(px, lo[:, None]), 0, 1)


def _region_boxes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plane index (L,) and box (L, 4) as x0, y0, x1, y1 (exclusive) of every label of a (P, H, W) array."""
    slices = list(chain.from_iterable(ndimage.find_objects(labels)))  # (plane, y, x) slices per label
    starts = np.fromiter(map(attrgetter("start"), slices), np.int64, len(slices)).reshape(-1, 3)
    stops = np.fromiter(map(attrgetter("stop"), slices), np.int64, len(slices)).reshape(-1, 3)
    boxes = np.stack([starts[:, 2], starts[:, 1], stops[:, 2], stops[:, 1]], axis=1).astype(np.float64)
    return starts[:, 0], boxes


class LocalizationMeter:
    """Streaming accumulator of the three localization measures, one batch of maps at a time.

    Args:
        num_predictors: K, maps per image.
        grid: Patch grid (rows, cols).
        image_size: Image (height, width) in pixels, or the side of a square image.
        thresholds: Thresholds tau for MaxBoxAccV2 (fractions of the map's max after min-max).
        deltas: IoU thresholds averaged by MaxBoxAccV2.
        convention: ``"epviz"`` (bilinear, exclusive boxes; default) or ``"wsol"``
            (wsolevaluation's bicubic upsampling and ``x + w`` boxes with inclusive IoU); see
            the module docstring.
        records: Also keep per-image records for bootstrap intervals (:meth:`image_records`):
            per image K*T*len(deltas) bits of box correctness, K float32 in-box masses, lifts
            and K pointing hits (about 1.5 kB per image for K = 16, T = 100).
    """

    def __init__(
        self,
        num_predictors: int,
        grid: Sequence[int],
        image_size: int | Sequence[int],
        thresholds: Sequence[float] | np.ndarray | None = None,
        deltas: Sequence[float] | np.ndarray = DELTAS,
        records: bool = False,
        convention: str = "epviz",
    ) -> None:
        self.convention = _check_convention(convention)
        self.k = check_int("num_predictors", num_predictors, 1)
        self.grid = _check_grid(grid)
        self.size = _as_size(image_size)
        self.thresholds = _check_thresholds(thresholds)
        self.deltas = _check_deltas(deltas)
        h, w = self.size
        rows, cols = self.grid
        self._wy, self._wx = _cell_weights(rows, h), _cell_weights(cols, w)
        cy = (np.arange(rows) + 0.5) * (h / rows)
        cx = (np.arange(cols) + 0.5) * (w / cols)
        self._centres = np.stack(np.broadcast_arrays(cx[None, :], cy[:, None]), -1).reshape(-1, 2)  # (N, 2) as (x, y)
        self.n = 0
        self.correct = np.zeros((self.k, len(self.thresholds), len(self.deltas)), dtype=np.int64)
        self.mass_sum = np.zeros(self.k)
        self.mass_sq = np.zeros(self.k)
        self.hits = np.zeros(self.k, dtype=np.int64)
        self.chance_sum = 0.0
        self.lift_sum: dict[str, np.ndarray] = {}  # box_lift, mask_lift, mask_lift_px: sums over images
        self.mask_mass_sum, self.mask_chance_sum, self.mask_n = np.zeros(self.k), 0.0, 0
        self.records = bool(records)
        self._records: dict[str, list[np.ndarray]] = {"box": [], "mass": [], "pointing": []}

    # --- accumulation ------------------------------------------------------------------

    def update(
        self,
        maps: np.ndarray | torch.Tensor,
        boxes: Sequence,
        indices: Sequence[int] | np.ndarray | None = None,
        masks: Sequence | None = None,
    ) -> None:
        """Add a batch.

        Args:
            maps: (b, K, N) maps over the patch tokens (or (b, N) when K == 1); finite, non-negative.
            boxes: Per image, its GT boxes (k, 4) xyxy pixels with exclusive x1, y1.
            indices: Dataset positions of the images, for error messages.
            masks: Per image, its object mask, bool (H, W); None when the dataset has none (then
                the mask columns are absent). Every batch of one meter gives masks, or none does.

        Raises:
            ConfigError: Maps of another shape than (b, K, rows * cols), negative, non-finite or all-zero
                maps, or boxes that are malformed, outside the image or not one set per image.
        """
        maps = self._check_maps(maps, indices)
        b = maps.shape[0]
        boxes = _box_list(boxes)
        if len(boxes) != b:
            raise ConfigError(f"got {b} images of maps but {len(boxes)} sets of boxes")
        indices = list(range(self.n, self.n + b)) if indices is None else [int(i) for i in indices]
        h, w = self.size
        gts = [check_boxes(bx, i, h, w) for bx, i in zip(boxes, indices)]
        if self.n and (masks is not None) != (self.mask_n == self.n):
            raise ConfigError("every batch of a localization meter must give masks, or none may")
        self._mass_and_pointing(maps, gts)
        if masks is not None:
            self._mask_lift(maps, [self._check_mask(m, i) for m, i in zip(masks, indices)])
        self._maxboxacc(maps, gts)
        self.n += b

    def _check_mask(self, mask, index: int) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != self.size or mask.dtype != bool:
            raise ConfigError(f"the mask of image {index} must be bool {self.size}, got {mask.dtype} {mask.shape}")
        if mask.all() or not mask.any():
            raise ConfigError(
                f"the mask of image {index} covers {'all' if mask.any() else 'none'} of the image: lift is undefined"
            )
        return mask

    def _add_lift(self, column: str, mass: np.ndarray, chance: np.ndarray) -> None:
        """Accumulate lift (m - c) / (1 - c) of (b, K) masses against (b,) chance levels (0 where c = 1:
        an object covering the whole image leaves no room above chance)."""
        room = 1 - chance[:, None]
        lift = np.where(room > 1e-9, (mass - chance[:, None]) / np.where(room > 1e-9, room, 1.0), 0.0)
        self.lift_sum[column] = self.lift_sum.get(column, np.zeros(self.k)) + lift.sum(0)
        if self.records:
            self._records.setdefault(column, []).append(lift.astype(np.float32))

    def _mask_lift(self, maps: np.ndarray, masks: list[np.ndarray]) -> None:
        probs = (maps / maps.sum(-1, keepdims=True)).astype(np.float64)  # (b, K, N)
        pixels = np.stack(masks).astype(np.float64)  # (b, H, W)
        cover = np.einsum("ry,byx,cx->brc", self._wy, pixels, self._wx).reshape(len(masks), -1)  # per token: share on mask
        chance = pixels.mean(axis=(1, 2))
        mass = np.einsum("bkn,bn->bk", probs, cover)
        self.mask_mass_sum += mass.sum(0)
        self.mask_chance_sum += chance.sum()
        self.mask_n += len(masks)
        self._add_lift("mask_lift", mass, chance)
        b, k, _ = probs.shape
        up = F.interpolate(
            torch.from_numpy(probs).view(b * k, 1, *self.grid), size=self.size, mode="bilinear", align_corners=False
        )
        up = up.clamp_min(0).view(b, k, -1)
        mass_px = (up * torch.from_numpy(pixels).view(b, 1, -1)).sum(-1) / up.sum(-1)
        self._add_lift("mask_lift_px", mass_px.numpy(), chance)

    def _check_maps(self, maps, indices) -> np.ndarray:
        maps = _as_maps(maps)
        n_tok = self.grid[0] * self.grid[1]
        if maps.ndim == 2 and self.k == 1:
            maps = maps[:, None]
        if maps.ndim != 3 or maps.shape[1] != self.k or maps.shape[2] != n_tok:
            raise ConfigError(
                f"maps must be (images, {self.k} predictors, {n_tok} tokens) for a {self.grid[0]}x{self.grid[1]} grid; "
                f"got shape {maps.shape}"
            )
        zero = maps.sum(-1) <= 0
        if zero.any():
            i, j = np.argwhere(zero)[0]
            where = i if indices is None else list(indices)[i]
            raise ConfigError(f"the map of image {where}, predictor {j} sums to 0: it is not a distribution")
        return np.ascontiguousarray(maps)

    def _mass_and_pointing(self, maps: np.ndarray, gts: list[np.ndarray]) -> None:
        h, w = self.size
        covers, insides = [], []
        for g in gts:
            pixels = (_axis_cover(g[:, 1], g[:, 3], h)[:, :, None] * _axis_cover(g[:, 0], g[:, 2], w)[:, None, :]).max(0)
            covers.append((self._wy @ pixels @ self._wx.T).reshape(-1))  # per token: area fraction inside the boxes
            self.chance_sum += pixels.sum() / (h * w)
            cx, cy = self._centres[:, 0:1], self._centres[:, 1:2]
            insides.append(((g[:, 0] <= cx) & (cx < g[:, 2]) & (g[:, 1] <= cy) & (cy < g[:, 3])).any(1))
        cover, inside = np.stack(covers), np.stack(insides)  # (b, N)
        probs = maps / maps.sum(-1, keepdims=True)
        mass = np.einsum("bkn,bn->bk", probs.astype(np.float64), cover)
        chance = cover.mean(1)  # the uniform map's in-box mass
        self._add_lift("box_lift", mass, chance)
        self.mass_sum += mass.sum(0)
        self.mass_sq += (mass**2).sum(0)
        top = maps.argmax(-1)  # (b, K)
        hit = np.take_along_axis(inside, top, axis=1)
        self.hits += hit.sum(0)
        if self.records:
            self._records["mass"].append(mass.astype(np.float32))
            self._records["pointing"].append(hit)

    def _scores(self, maps: np.ndarray) -> np.ndarray:
        """(m, N) maps -> (m, H, W) float64 scores in [0, 1]: upsampled, then min-max normalised.

        A map constant on the token grid gives all zeros (no box at any threshold).
        """
        m = len(maps)
        h, w = self.size
        flat = torch.from_numpy(np.ascontiguousarray(maps)).reshape(m, -1)
        constant = (flat == flat[:, :1]).all(dim=1)  # on the tokens, before any interpolation
        up = flat.view(m, 1, *self.grid)
        if up.shape[-2:] != (h, w):
            mode = "bicubic" if self.convention == "wsol" else "bilinear"
            # float64, rounded back to float32: a flat stretch of float32 tokens comes back exactly flat
            up = F.interpolate(up.double(), size=(h, w), mode=mode, align_corners=False).float()
        up = up.reshape(m, h * w).double()
        lo, hi = up.min(dim=1, keepdim=True).values, up.max(dim=1, keepdim=True).values
        span = hi - lo
        keep = (span > 0) & ~constant[:, None]
        up = torch.where(keep, (up - lo) / span.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(up))
        return up.view(m, h, w).numpy()

    def _maxboxacc(self, maps: np.ndarray, gts: list[np.ndarray]) -> None:
        b, k, _ = maps.shape
        h, w = self.size
        t = len(self.thresholds)
        scores = maps.reshape(b * k, -1)  # upsampled one chunk at a time (self._scores)

        kmax = max(len(g) for g in gts)
        gt = np.zeros((b, kmax, 4))
        valid = np.zeros((b, kmax), dtype=bool)  # padding boxes score IoU 0
        for i, g in enumerate(gts):
            gt[i, : len(g)] = g
            valid[i, : len(g)] = True
        # "epviz": exclusive boxes, area (x1 - x0)(y1 - y0); "wsol": inclusive, area (x1 - x0 + 1)(y1 - y0 + 1)
        one = 1.0 if self.convention == "wsol" else 0.0
        gt_area = (gt[..., 2] - gt[..., 0] + one) * (gt[..., 3] - gt[..., 1] + one)

        step = max(1, _VOXEL_BUDGET // (t * h * w))
        record = np.zeros((b * k, t, len(self.deltas)), dtype=bool) if self.records else None
        for start in range(0, b * k, step):
            chunk = self._scores(scores[start : start + step])
            m = len(chunk)
            stack = chunk[:, None] > self.thresholds[None, :, None, None]  # (m, T, H, W); float64 both sides
            labels, count = ndimage.label(stack.reshape(m * t, h, w), structure=_STRUCTURE)
            best = np.zeros(m * t)
            if count:
                plane, rbox = _region_boxes(labels)
                if one:  # "wsol": cv2.boundingRect's x + w, clipped to the last pixel
                    rbox[:, 2] = np.minimum(rbox[:, 2], w - 1)
                    rbox[:, 3] = np.minimum(rbox[:, 3], h - 1)
                image = (start + plane // t) // k
                g = gt[image]  # (L, kmax, 4)
                ix = np.clip(np.minimum(rbox[:, None, 2], g[..., 2]) - np.maximum(rbox[:, None, 0], g[..., 0]) + one, 0, None)
                iy = np.clip(np.minimum(rbox[:, None, 3], g[..., 3]) - np.maximum(rbox[:, None, 1], g[..., 1]) + one, 0, None)
                inter = ix * iy
                r_area = (rbox[:, 2] - rbox[:, 0] + one) * (rbox[:, 3] - rbox[:, 1] + one)
                iou = np.where(valid[image], inter / (r_area[:, None] + gt_area[image] - inter), 0.0).max(1)
                np.maximum.at(best, plane, iou)
            correct = best.reshape(m, t)[:, :, None] >= self.deltas  # (m, T, deltas)
            np.add.at(self.correct, (start + np.arange(m)) % k, correct)
            if record is not None:
                record[start : start + m] = correct
        if record is not None:
            self._records["box"].append(np.packbits(record.reshape(b, -1), axis=1))

    # --- results -----------------------------------------------------------------------

    def accuracy(self) -> np.ndarray:
        """Box accuracy per (predictor, tau, delta), shape (K, T, len(deltas))."""
        if self.n == 0:
            raise ValueError("no images were added: there is nothing to summarise")
        return self.correct / self.n

    def summary(self, context: Mapping | None = None) -> pd.DataFrame:
        """One row per predictor: MaxBoxAccV2 and its per-delta parts, in-box mass, chance, pointing."""
        return frame(self.rows(), context_columns(context))

    def rows(self) -> list[dict]:
        """The rows of :meth:`summary`, without the context columns."""
        acc = self.accuracy()
        best_acc, best_tau = acc.max(1), self.thresholds[acc.argmax(1)]  # dataset-level best tau per delta
        mean = self.mass_sum / self.n
        std = np.sqrt(np.clip(self.mass_sq / self.n - mean**2, 0, None))
        rows = []
        for j in range(self.k):
            row: dict = dict(predictor=j)
            if self.mask_n:
                row.update(
                    mask_lift=self.lift_sum["mask_lift"][j] / self.n,
                    mask_lift_px=self.lift_sum["mask_lift_px"][j] / self.n,
                    mask_mass=self.mask_mass_sum[j] / self.n,
                    mask_chance=self.mask_chance_sum / self.n,
                )
            row.update(box_lift=self.lift_sum["box_lift"][j] / self.n, maxboxacc_v2=float(best_acc[j].mean()))
            for name, a, tau in zip(_delta_names(self.deltas), best_acc[j], best_tau[j]):
                row[f"maxboxacc_{name}"] = float(a)
                row[f"best_tau_{name}"] = float(tau)
            row.update(
                inbox_mass=float(mean[j]),
                inbox_mass_std=float(std[j]),
                chance_mass=self.chance_sum / self.n,
                pointing=self.hits[j] / self.n,
                n_images=self.n,
            )
            rows.append(row)
        return rows

    def image_records(self) -> dict[str, np.ndarray]:
        """Per-image records (``records=True``): ``box`` (n, K*T*len(deltas) bits) packed with
        ``np.packbits`` (unpack to (n, K, T, len(deltas)) box correctness), ``mass`` (n, K) in-box
        mass, ``pointing`` (n, K) hits, ``box_lift`` and, with masks, ``mask_lift`` and
        ``mask_lift_px`` (n, K)."""
        if not self.records:
            raise ValueError("this LocalizationMeter keeps no per-image records: build it with records=True")
        nbytes = -(-self.k * len(self.thresholds) * len(self.deltas) // 8)
        empty: dict[str, np.ndarray] = {
            "box": np.zeros((0, nbytes), np.uint8),
            "mass": np.zeros((0, self.k), np.float32),
            "pointing": np.zeros((0, self.k), bool),
            "box_lift": np.zeros((0, self.k), np.float32),
        }
        return {key: np.concatenate(parts) if parts else empty[key] for key, parts in self._records.items()}

    def curves(self, context: Mapping | None = None) -> pd.DataFrame:
        """Box accuracy for every (predictor, delta, tau): the curves MaxBoxAccV2 maximises."""
        acc = self.accuracy()
        j, t, d = np.meshgrid(np.arange(self.k), np.arange(len(self.thresholds)), np.arange(len(self.deltas)), indexing="ij")
        rows = pd.DataFrame(
            dict(predictor=j.ravel(), iou=self.deltas[d.ravel()], tau=self.thresholds[t.ravel()], box_acc=acc.ravel())
        )
        return frame(rows.to_dict("records"), context_columns(context), columns=list(rows.columns))


def localization_from_maps(
    maps: np.ndarray | torch.Tensor,
    boxes: Sequence,
    grid: Sequence[int],
    image_size: int | Sequence[int],
    *,
    thresholds: Sequence[float] | np.ndarray | None = None,
    deltas: Sequence[float] = DELTAS,
    context: Mapping | None = None,
    batch_size: int = 64,
    convention: str = "epviz",
    intervals: bool = False,
    masks: Sequence | None = None,
) -> pd.DataFrame:
    """Localization measures of precomputed maps.

    Args:
        maps: (n, K, N) maps over the patch tokens, or (n, N) for one predictor.
        boxes: Per image, its GT boxes ((k, 4) or (4,), xyxy pixels, exclusive x1, y1).
        grid: Patch grid (rows, cols), rows * cols == N.
        image_size: Image (height, width), or the side of a square image.
        thresholds: MaxBoxAccV2 thresholds, strictly increasing in [0, 1] (default 0..0.99 step 0.01).
        deltas: IoU thresholds in (0, 1] (default 0.3, 0.5, 0.7).
        context: Values of the context columns.
        batch_size: Images processed together.
        convention: MaxBoxAccV2 conventions, ``"epviz"`` (default: bilinear, exclusive boxes) or
            ``"wsol"`` (wsolevaluation's bicubic upsampling, ``x + w`` boxes, inclusive IoU).
        masks: Per image, its object mask, bool (H, W): adds the mask-lift columns.
        intervals: Add the 95% bootstrap intervals over images of the lifts, MaxBoxAccV2, the in-box
            mass and the pointing game (``<column>_lo`` / ``<column>_hi``; B = 1000 resamples, seed 0, as in
            :mod:`epviz.analysis.intervals`).

    Returns:
        The per-predictor summary (see :meth:`LocalizationMeter.summary`); a :class:`LocalizationMeter` fed
        the same maps gives the per-(predictor, iou, tau) accuracy curves (:meth:`LocalizationMeter.curves`).

    Raises:
        ConfigError: Any argument out of range, before any work: maps that are not (n, K, rows * cols)
            with n, K >= 1, or hold negative, non-finite or all-zero maps; boxes that are not one (k, 4)
            set per image with x0 < x1, y0 < y1 inside the image; a grid or image size that is not
            positive integers; thresholds outside [0, 1] or not increasing; deltas outside (0, 1].
    """
    maps = _as_maps(maps)
    boxes = _box_list(boxes)
    batch_size = check_int("batch_size", batch_size, 1)
    k = maps.shape[1] if maps.ndim == 3 else 1
    meter = LocalizationMeter(k, grid, image_size, thresholds, deltas, records=intervals, convention=convention)
    _delta_names(meter.deltas)  # the summary's columns, before any work
    maps = meter._check_maps(maps, None)
    if len(boxes) != len(maps):
        raise ConfigError(f"got maps of {len(maps)} images but boxes of {len(boxes)}")
    for i, bx in enumerate(boxes):
        check_boxes(bx, i, *meter.size)
    for start in range(0, len(maps), batch_size):
        stop = min(start + batch_size, len(maps))
        part = None if masks is None else [masks[i] for i in range(start, stop)]
        meter.update(maps[start:stop], [boxes[i] for i in range(start, stop)], range(start, stop), part)
    summary = meter.summary(context)
    if intervals:
        summary = _with_intervals(summary, meter)
    return summary


def _box_list(boxes) -> list:
    """Per image, its boxes: any sized iterable (a list, an (n, k, 4) array) or a one-pass iterable."""
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Iterable):
        raise ConfigError(f"boxes must hold one set of (k, 4) xyxy pixel boxes per image, got {boxes!r:.200}")
    return list(boxes)


def _resampled(meter: LocalizationMeter, weights: np.ndarray) -> dict[str, np.ndarray]:
    """MaxBoxAccV2 (best tau re-chosen per delta inside every resample), in-box mass and pointing, (B, K) each."""
    from epviz.analysis.intervals import resample_maxboxacc, weighted_mean

    rec = meter.image_records()
    lifts: dict[str, np.ndarray] = {
        c: weighted_mean(weights, rec[c]) for c in ("mask_lift", "mask_lift_px", "box_lift") if c in rec
    }
    return {
        **lifts,
        "maxboxacc_v2": resample_maxboxacc(rec["box"], (meter.k, len(meter.thresholds), len(meter.deltas)), weights),
        "inbox_mass": weighted_mean(weights, rec["mass"]),
        "pointing": weighted_mean(weights, rec["pointing"]),
    }


def _with_intervals(summary: pd.DataFrame, meter: LocalizationMeter) -> pd.DataFrame:
    """`summary` with ``<column>_lo`` / ``<column>_hi`` of every resampled column (bootstrap over images)."""
    from epviz.analysis.intervals import bootstrap_weights, percentile_interval

    n = len(meter.image_records()["mass"])
    parts: dict[str, list[np.ndarray]] = {}
    for weights in bootstrap_weights(n):
        for column, values in _resampled(meter, weights).items():
            parts.setdefault(column, []).append(values)
    out = summary.copy()
    for column, chunks in parts.items():
        lo, hi = percentile_interval(np.concatenate(chunks))
        position = out.columns.get_loc(column) + 1
        out.insert(position, f"{column}_lo", lo[out["predictor"].to_numpy()])
        out.insert(position + 1, f"{column}_hi", hi[out["predictor"].to_numpy()])
    return out


def _image_size_of(dataset, image_size) -> tuple[int, int]:
    if image_size is not None:
        return _as_size(image_size)
    if isinstance(dataset, (ImageDataset, GroundTruthBoxes)):
        return _as_size(dataset.image_size)
    raise ValueError("localization needs the image size: pass image_size=(height, width) (the dataset has no `image_size`)")


@register_meter("localization")
class Localization(Meter):
    """Lift on the object mask and box, MaxBoxAccV2 (and its per-IoU parts and best taus), in-box
    mass, chance mass and pointing (see the module docstring); the mask columns where the dataset
    has masks.

    The costly measure: it runs on the pass's ``localization_index`` images, and upsamples at
    most `chunk_size` images' maps at a time (a :class:`LocalizationMeter` accumulates them).

    Args:
        image_size: Image (height, width); default from ``dataset.image_size``.
        thresholds: MaxBoxAccV2 thresholds (default 0..0.99 step 0.01).
        deltas: IoU thresholds (default 0.3, 0.5, 0.7).
        chunk_size: Images whose maps are upsampled together.
        records: Keep per-image records, for bootstrap intervals (:meth:`resample`; sizes in
            :class:`LocalizationMeter`).
        convention: MaxBoxAccV2 conventions, ``"epviz"`` (default: bilinear, exclusive boxes) or
            ``"wsol"`` (wsolevaluation's bicubic upsampling, ``x + w`` boxes, inclusive IoU).
    """

    columns = {
        "mask_lift": "lift: mass on the object mask above chance",
        "mask_lift_px": "lift on the object mask, at pixels",
        "box_lift": "lift: mass in the GT box above chance",
        "mask_mass": "attention mass on the object mask",
        "mask_chance": "object's share of the image (chance mass)",
        "maxboxacc_v2": "MaxBoxAccV2 (localization)",
        "inbox_mass": "attention mass inside the GT box",
        "chance_mass": "attention mass inside the GT box, uniform map (chance)",
        "pointing": "pointing game (argmax in box)",
    }
    table_columns = ("box_lift", "maxboxacc_v2", "inbox_mass", "pointing")
    subset = "localization_index"
    order = 10.0
    table_order = 20.0

    def __init__(
        self,
        image_size: int | Sequence[int] | None = None,
        thresholds: Sequence[float] | np.ndarray | None = None,
        deltas: Sequence[float] = DELTAS,
        chunk_size: int = 64,
        records: bool = True,
        convention: str = "epviz",
    ) -> None:
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.convention = _check_convention(convention)
        self.image_size = None if image_size is None else _as_size(image_size)
        self.thresholds, self.deltas = _check_thresholds(thresholds), _check_deltas(deltas)
        _delta_names(self.deltas)  # the summary's columns, before any work
        self.records = bool(records)
        self.meter: LocalizationMeter | None = None
        self._positions: list[np.ndarray] = []

    def start(self, probe: Probe, tokens: TokenSet, dataset=None) -> None:
        if dataset is None:
            raise ValueError("the localization meter needs GT boxes: pass the images' dataset to measure(probe, tokens, dataset)")
        self._boxes_of, self._masks_of = box_source(dataset), mask_source(dataset)
        size = _image_size_of(dataset, self.image_size)
        if len(dataset) != len(tokens):
            raise ValueError(f"the dataset has {len(dataset)} images but the tokens {len(tokens)}: they must be the same images")
        self.meter = LocalizationMeter(
            probe.num_predictors,
            tokens.grid,
            size,
            self.thresholds,
            self.deltas,
            records=self.records,
            convention=self.convention,
        )
        self._positions = []

    def update(self, maps: torch.Tensor | None, batch: MeterBatch) -> None:
        assert maps is not None  # needs_maps: measure hands this meter the maps
        positions = batch.index
        self._positions.append(np.asarray(positions, dtype=np.int64))
        for start in range(0, len(positions), self.chunk_size):
            part = positions[start : start + self.chunk_size]
            masks = None if self._masks_of is None else [self._masks_of(int(i)) for i in part]
            self._started().update(maps[start : start + self.chunk_size], [self._boxes_of(int(i)) for i in part], part, masks)

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame(self._started().rows())

    def curves(self, context: Mapping | None = None) -> pd.DataFrame:
        """Box accuracy for every (predictor, delta, tau): see :meth:`LocalizationMeter.curves`."""
        return self._started().curves(context)

    def positions(self) -> np.ndarray | None:
        if not self.records or self.meter is None:
            return None
        return np.concatenate(self._positions) if self._positions else np.zeros(0, np.int64)

    def resample(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """MaxBoxAccV2 (best tau re-chosen per delta inside every resample), in-box mass and pointing, per resample."""
        return _resampled(self._started(), weights)

    def _started(self) -> LocalizationMeter:
        if self.meter is None:
            raise ValueError("the localization meter has not started: run it through measure(probe, tokens, dataset)")
        return self.meter


def localization(
    probe: Probe,
    tokens: TokenSet,
    dataset,
    *,
    image_size: int | Sequence[int] | None = None,
    context: Mapping | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    deltas: Sequence[float] = DELTAS,
    batch_size: int = 64,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    convention: str = "epviz",
) -> pd.DataFrame:
    """Localization quality of every attention predictor of `probe` over a dataset with GT boxes.

    Args:
        probe: A trained attentive probe.
        tokens: Tokens of the dataset's images, in the dataset's order.
        dataset: The images' dataset with GT boxes (``box_list(i)`` or ``boxes``), or the boxes.
        image_size: Image (height, width); default from ``dataset.image_size``.
        context: Values of the context columns (defaults: probe name, ``tokens.origin``).
        thresholds: MaxBoxAccV2 thresholds (default 0..0.99 step 0.01).
        deltas: IoU thresholds (default 0.3, 0.5, 0.7).
        batch_size: Images per batch (maps are upsampled one batch at a time).
        index: Optional subset of sample positions.
        device: Where to run the probe; None picks automatically.
        precision: "fp32" or "bf16".
        convention: MaxBoxAccV2 conventions, ``"epviz"`` (default: bilinear, exclusive boxes) or
            ``"wsol"`` (wsolevaluation's bicubic upsampling, ``x + w`` boxes, inclusive IoU).

    Returns:
        One row per predictor: maxboxacc_v2, maxboxacc_iouXX, best_tau_iouXX, inbox_mass,
        inbox_mass_std, chance_mass, pointing, n_images. The curves MaxBoxAccV2 maximises: run a
        :class:`Localization` meter through :func:`~epviz.analysis.measure` and read its :meth:`Localization.curves`.
    """
    require_predictors(probe, "localization")
    meter = Localization(image_size, thresholds, deltas, chunk_size=batch_size, convention=convention)
    return measure(
        probe, tokens, dataset, [meter], index=index, batch_size=batch_size, device=device, precision=precision, context=context
    )
