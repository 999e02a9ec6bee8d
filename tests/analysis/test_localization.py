"""Localization: hand-made maps with known answers, a per-threshold reference, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from skimage.measure import label, regionprops

import epviz.probes as probes
from epviz.analysis import Localization, LocalizationMeter, localization, localization_from_maps, measure
from epviz.errors import ConfigError
from epviz.evaluate import collect_attention
from epviz.tokens import TokenOrigin, TokenSet
from tests.toy_tokens import noise_tokens, sharp_probe

GRID, SIZE = (8, 8), 64  # 8x8 patches of 8x8 pixels
N = 64


def summary_and_curves(maps, boxes, grid, size, **options):
    """The summary of localization_from_maps and the curves of a LocalizationMeter fed the same maps."""
    meter = LocalizationMeter(maps.shape[1], grid, size, **options)
    meter.update(maps, list(boxes), range(len(maps)))
    summary = localization_from_maps(maps, boxes, grid, size, **options)
    return summary, meter.curves()


def token_map(cells):
    """A map over the 8x8 grid, uniform over the given (row, col) cells."""
    m = np.zeros(GRID)
    for r, c in cells:
        m[r, c] = 1.0
    return (m / m.sum()).ravel()


def block(r0, r1, c0, c1):
    return [(r, c) for r in range(r0, r1) for c in range(c0, c1)]


BOX = np.array([16, 24, 40, 48])  # x0, y0, x1, y1: patch columns 2..4, rows 3..5


def test_perfect_box_map():
    maps = token_map(block(3, 6, 2, 5))[None, None]
    df = localization_from_maps(maps, [BOX], GRID, SIZE)
    row = df.iloc[0]
    assert row["maxboxacc_v2"] == 1.0
    assert row["maxboxacc_iou30"] == row["maxboxacc_iou50"] == row["maxboxacc_iou70"] == 1.0
    assert row["inbox_mass"] == pytest.approx(1.0)
    assert row["pointing"] == 1.0
    assert row["chance_mass"] == pytest.approx(24 * 24 / 64**2)


def test_map_far_from_the_box():
    maps = token_map([(0, 7)])[None, None]
    df = localization_from_maps(maps, [np.array([0, 40, 24, 64])], GRID, SIZE)
    row = df.iloc[0]
    assert row["maxboxacc_v2"] == 0.0 and row["inbox_mass"] == 0.0 and row["pointing"] == 0.0


def test_uniform_map_mass_is_the_chance_level():
    maps = np.full((2, 1, N), 1 / N)
    boxes = [BOX, np.array([[0, 0, 10, 30], [5, 20, 30, 45]])]  # the second image: two overlapping boxes
    df = localization_from_maps(maps, boxes, GRID, SIZE)
    union = np.zeros((SIZE, SIZE), bool)
    union[0:30, 0:10] = union[20:45, 5:30] = True
    chance = np.mean([24 * 24 / SIZE**2, union.mean()])
    assert df["chance_mass"].iloc[0] == pytest.approx(chance)
    assert df["inbox_mass"].iloc[0] == pytest.approx(chance)
    assert df["maxboxacc_v2"].iloc[0] == 0.0  # a constant map yields no region at all


@pytest.mark.parametrize("grid,size", [((7, 7), 64), ((6, 5), (50, 41))])
def test_mass_with_patches_that_do_not_divide_the_image(grid, size):
    h, w = (size, size) if isinstance(size, int) else size
    n = grid[0] * grid[1]
    box = np.array([3.0, 5.0, 30.0, 33.0])
    uniform = np.full((1, 1, n), 1 / n)
    df = localization_from_maps(uniform, [box], grid, size)
    assert df["inbox_mass"].iloc[0] == pytest.approx(27 * 28 / (h * w))
    # a map on one token: the mass is the token's area fraction inside the box
    r, c = 1, 1
    onehot = np.zeros((1, 1, n))
    onehot[0, 0, r * grid[1] + c] = 1
    ph, pw = h / grid[0], w / grid[1]
    fx = (min((c + 1) * pw, 30) - max(c * pw, 3)) / pw
    fy = (min((r + 1) * ph, 33) - max(r * ph, 5)) / ph
    df = localization_from_maps(onehot, [box], grid, size)
    assert df["inbox_mass"].iloc[0] == pytest.approx(fx * fy)


def test_every_connected_region_is_boxed():
    # one blob on the box, a second, equally strong blob far away: their joint box would miss
    maps = token_map(block(3, 6, 2, 5) + block(0, 2, 6, 8))[None, None]
    df = localization_from_maps(maps, [BOX], GRID, SIZE)
    assert df["maxboxacc_v2"].iloc[0] == 1.0
    assert df["inbox_mass"].iloc[0] == pytest.approx(9 / 13)


def test_best_threshold_is_chosen_for_the_dataset_not_per_image():
    # image size == grid: no interpolation, so the maps are pixel maps
    a = np.zeros((8, 8))
    a[0:4, 0:4] = 1.0  # the GT box
    a[:, 4:8] = 0.55  # joined to it at low thresholds: union box IoU 0.25 -> correct only for tau >= 0.55
    b = np.zeros((8, 8))
    b[0:6, 0:6] = 0.25  # the GT box
    b[0:2, 0:2] = 1.0  # its peak: IoU 4/36 -> correct only for tau < 0.25
    maps = np.stack([a, b]).reshape(2, 1, 64)
    boxes = [np.array([0, 0, 4, 4]), np.array([0, 0, 6, 6])]
    df, curves = summary_and_curves(maps, boxes, (8, 8), 8)
    per_image = [localization_from_maps(maps[i : i + 1], boxes[i : i + 1], (8, 8), 8)["maxboxacc_v2"].iloc[0] for i in range(2)]
    assert per_image == [1.0, 1.0]  # best tau chosen per image would score 1
    assert df["maxboxacc_v2"].iloc[0] == pytest.approx(0.5)
    acc = curves[curves["iou"] == 0.5].set_index("tau")["box_acc"]
    assert acc[0.1] == 0.5 and acc[0.3] == 0.0 and acc[0.6] == 0.5
    assert df["best_tau_iou50"].iloc[0] == 0.0


def test_multiple_gt_boxes_any_box_counts():
    maps = token_map(block(3, 6, 2, 5))[None, None]
    boxes = [np.array([[0, 0, 8, 8], BOX])]
    row = localization_from_maps(maps, boxes, GRID, SIZE).iloc[0]
    assert row["maxboxacc_v2"] == 1.0 and row["pointing"] == 1.0


def reference_box_accuracy(maps, boxes, grid, size, thresholds, deltas):
    """Straightforward MaxBoxAccV2 curves: skimage label + regionprops per threshold."""
    n, k, _ = maps.shape
    correct = np.zeros((k, len(thresholds), len(deltas)))
    up = (
        F.interpolate(
            torch.tensor(maps, dtype=torch.float32).view(n * k, 1, *grid), size=(size, size), mode="bilinear", align_corners=False
        )
        .view(n, k, size, size)
        .numpy()
    )
    for i in range(n):
        for j in range(k):
            s = up[i, j]
            s = (s - s.min()) / (s.max() - s.min())
            for t, tau in enumerate(thresholds):
                best = 0.0
                for region in regionprops(label(s > tau, connectivity=2)):
                    y0, x0, y1, x1 = region.bbox
                    for gx0, gy0, gx1, gy1 in np.atleast_2d(boxes[i]):
                        iw = max(0, min(x1, gx1) - max(x0, gx0))
                        ih = max(0, min(y1, gy1) - max(y0, gy0))
                        inter = iw * ih
                        best = max(best, inter / ((x1 - x0) * (y1 - y0) + (gx1 - gx0) * (gy1 - gy0) - inter))
                correct[j, t] += best >= np.asarray(deltas)
    return correct / n


def test_vectorised_boxes_match_a_per_threshold_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 2, N)) * 2
    maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    boxes = [
        np.array([[8, 8, 40, 56]]),
        np.array([[0, 0, 64, 30], [30, 30, 60, 60]]),
        np.array([20, 4, 44, 28]),
        np.array([1, 1, 63, 63]),
        np.array([30, 30, 34, 36]),
    ]
    thresholds = np.arange(0, 1, 0.05)
    deltas = (0.1, 0.3, 0.5)
    meter = LocalizationMeter(2, GRID, SIZE, thresholds, deltas)
    meter.update(maps[:3], boxes[:3])
    meter.update(maps[3:], boxes[3:])
    expected = reference_box_accuracy(maps, boxes, GRID, SIZE, thresholds, deltas)
    np.testing.assert_allclose(meter.accuracy(), expected)
    assert 0 < expected.mean() < 1


class BoxedSet:
    """A minimal dataset with boxes and an image size."""

    image_size = SIZE

    def __init__(self, boxes):
        self.boxes = boxes

    def __len__(self):
        return len(self.boxes)


class Unboxed:
    def __len__(self):
        return 12


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    tokens = noise_tokens(rng, 12, dim=16, grid=GRID)
    probe = sharp_probe("ep", None, 3, scale=100, num_queries=4, dim=16, grid=GRID)
    x0, y0 = rng.integers(0, 40, 12), rng.integers(0, 40, 12)
    boxes = torch.tensor(np.stack([x0, y0, x0 + 20, y0 + 24], 1))
    return tokens, probe, boxes


def test_probe_path_streams_and_matches_precomputed_maps(setup):
    tokens, probe, boxes = setup
    df = localization(probe, tokens, BoxedSet(boxes), batch_size=5, context={"seed": 3})
    maps = collect_attention(probe, tokens)
    ref = localization_from_maps(maps, list(boxes), GRID, SIZE)
    assert len(df) == 4 and df["predictor"].tolist() == [0, 1, 2, 3]
    assert (df["probe"] == "ep").all() and (df["backbone"] == "toy").all() and (df["seed"] == 3).all()
    cols = ["maxboxacc_v2", "inbox_mass", "inbox_mass_std", "chance_mass", "pointing", "n_images"]
    np.testing.assert_allclose(df[cols].to_numpy(float), ref[cols].to_numpy(float))
    for column in ("maxboxacc_v2", "inbox_mass", "pointing"):
        assert df[column].between(0, 1).all()


def test_dataset_without_boxes(setup):
    tokens, probe, _ = setup
    with pytest.raises(ValueError, match="needs GT boxes: a `boxes` attribute"):
        localization(probe, tokens, Unboxed(), image_size=SIZE)


def test_box_outside_the_image_names_image_and_box(setup):
    tokens, probe, boxes = setup
    bad = boxes.clone()
    bad[1] = torch.tensor([50, 10, 70, 30])
    with pytest.raises(ValueError, match=r"GT box \[50.0, 10.0, 70.0, 30.0\] of image 1 lies outside the 64x64"):
        localization(probe, tokens, BoxedSet(bad))


def test_zero_area_box():
    with pytest.raises(ValueError, match=r"GT box \[5.0, 5.0, 5.0, 9.0\] of image 2 has zero area"):
        localization_from_maps(np.full((3, 1, N), 1 / N), [BOX, BOX, np.array([5, 5, 5, 9])], GRID, SIZE)


def test_image_without_boxes():
    with pytest.raises(ValueError, match="image 0 has no GT box"):
        localization_from_maps(np.full((1, 1, N), 1 / N), [np.zeros((0, 4))], GRID, SIZE)


def test_wrong_map_shape():
    with pytest.raises(ValueError, match="maps must be"):
        localization_from_maps(np.full((1, 1, 60), 1 / 60), [BOX], GRID, SIZE)


GOOD = dict(maps=np.full((2, 1, N), 1 / N), boxes=[BOX, BOX], grid=GRID, image_size=SIZE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # maps: shape, type, values (a 1-D map raised an IndexError, complex ones dropped their imaginary part)
        (dict(maps=np.full(N, 1 / N)), r"maps must be \(images, predictors, tokens\).*got shape \(64,\)"),
        (dict(maps=np.zeros((0, 1, N)), boxes=[]), r"got shape \(0, 1, 64\)"),
        (dict(maps=np.full((2, 1, N), 1 / N) + 1j), "maps must be an array of real numbers, got dtype complex128"),
        (dict(maps=[["x"] * N] * 2), "maps must be an array of real numbers"),
        (dict(maps=[[1.0] * N, [1.0]]), "maps must be a rectangular array"),
        (dict(maps=np.full((2, 1, N), -1.0)), "the map of image 0, predictor 0 holds -1.0: maps must be finite, non-negative"),
        (dict(maps=np.full((2, 1, N), np.inf)), "holds inf"),
        (dict(maps=np.full((2, 1, N), 1e300)), "float32's range"),
        (dict(maps=np.zeros((2, 1, N))), "sums to 0"),
        # boxes: one (k, 4) set per image, x0 < x1, y0 < y1, inside the image (None raised a TypeError)
        (dict(boxes=None), "boxes must hold one set of"),
        (dict(boxes=[BOX]), "got maps of 2 images but boxes of 1"),
        (dict(boxes=[BOX, "abcd"]), "the GT boxes of image 1 must be an array of real numbers"),
        (dict(boxes=[BOX, [0, 0, 8]]), r"GT boxes of image 1 must be \(k, 4\)"),
        (dict(boxes=[BOX, [8, 0, 0, 8]]), "has zero area"),
        (dict(boxes=[BOX, [0, 9, 8, 8]]), "has zero area"),
        (dict(boxes=[BOX, [0, 0, 65, 8]]), "lies outside the 64x64"),
        (dict(boxes=[BOX, [-1, 0, 8, 8]]), "lies outside the 64x64"),
        (dict(boxes=[BOX, [0, 0, np.nan, 8]]), "is not finite"),
        # grids: two positive integers whose product is the maps' token count (a third value was dropped,
        # 8.5 truncated, 0 a ZeroDivisionError, a single number a TypeError)
        (dict(grid=(8, 8, 1)), r"grid must hold exactly 2 values, e\.g\. grid=\(14, 14\); got 3"),
        (dict(grid=8), "grid must be a sequence, not the single number 8"),
        (dict(grid=(0, 8)), r"grid\[0\] must be an integer >= 1, got 0"),
        (dict(grid=(8, 8.5)), r"grid\[1\] must be an integer >= 1, got 8.5"),
        (dict(grid=(True, 8)), r"grid\[0\] must be an integer >= 1, got True"),
        (dict(grid=(4, 4)), r"maps must be \(images, 1 predictors, 16 tokens\) for a 4x4 grid; got shape \(2, 1, 64\)"),
        (dict(image_size=0), "image_size must be an integer >= 1, got 0"),
        (dict(image_size=64.5), "image_size must be an integer >= 1, got 64.5"),
        (dict(image_size=(64, 64, 3)), "image_size must hold exactly 2 values"),
        # thresholds in [0, 1], strictly increasing (outside values passed); deltas in (0, 1], one column each
        (dict(thresholds=(-0.1, 0.5)), r"thresholds\[0\] must be a finite number in \[0, 1\], got -0.1"),
        (dict(thresholds=(0.5, 1.5)), r"thresholds\[1\] must be a finite number in \[0, 1\], got 1.5"),
        (dict(thresholds=(0.5, np.nan)), r"thresholds\[1\] must be a finite number"),
        (dict(thresholds=(0.5, 0.2)), r"thresholds=\[0.5, 0.2\] must strictly increase"),
        (dict(thresholds=(0.5, 0.5)), "must strictly increase"),
        (dict(thresholds=0.5), "thresholds must be a sequence"),
        (dict(thresholds=()), "thresholds must hold at least one value"),
        (dict(deltas=(0.0, 0.5)), r"deltas\[0\] must be a finite number in \(0, 1\], got 0.0"),
        (dict(deltas=(np.nan,)), r"deltas\[0\] must be a finite number"),
        (dict(deltas=(0.5, 0.502)), "name the same column twice"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(batch_size=True), "batch_size must be an integer >= 1, got True"),
        (dict(convention="cv2"), "convention must be one of"),
    ],
)
def test_bad_arguments_are_refused_at_the_door(change, message):
    with pytest.raises(ConfigError, match=message):
        localization_from_maps(**{**GOOD, **change})


def test_the_meter_and_the_measure_check_their_arguments_when_built():
    for build in (
        lambda: LocalizationMeter(1, (8, 8, 1), SIZE),
        lambda: LocalizationMeter(True, GRID, SIZE),
        lambda: LocalizationMeter(1, GRID, SIZE, thresholds=(0.2, 1.2)),
        lambda: Localization(thresholds=(0.2, 1.2)),
        lambda: Localization(deltas=(0.5, 0.5)),
        lambda: Localization(image_size=(64, 0)),
    ):
        with pytest.raises(ConfigError):
            build()


ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
MALFORMED = {  # per argument, values of any shape and content
    "maps": arrays(np.float64, array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4), elements=ANY_FLOAT),
    "boxes": st.none() | st.lists(st.none() | st.lists(st.integers(-2, 8) | ANY_FLOAT, max_size=5), max_size=4),
    "grid": st.integers(-1, 4) | st.lists(st.integers(-1, 4) | st.floats(0, 4) | st.booleans(), max_size=3),
    "image_size": st.integers(-1, 6) | st.floats(0, 6) | st.lists(st.integers(-1, 6) | st.floats(0, 6), max_size=3),
    "thresholds": st.floats(-1, 2) | st.lists(ANY_FLOAT, max_size=3),
    "deltas": st.lists(ANY_FLOAT, max_size=3),
    "batch_size": st.integers(-1, 3) | st.floats(0, 3) | st.booleans(),
}


@st.composite
def arguments(draw):
    """Valid arguments of localization_from_maps, one of them (or none) replaced by a malformed value."""
    n, k, rows, cols, h, w = (draw(st.integers(1, 3)) for _ in range(6))
    maps = draw(arrays(np.float64, (n, k, rows * cols), elements=st.floats(0, 10))) + 0.01
    boxes = []
    for _ in range(n):
        x0, y0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
        boxes.append([x0, y0, draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))])
    args = dict(maps=maps, boxes=boxes, grid=(rows, cols), image_size=(h, w), thresholds=(0.0, 0.5), deltas=(0.5,))
    bad = draw(st.sampled_from([None, *MALFORMED]))
    if bad is not None:
        args[bad] = draw(MALFORMED[bad])
    return args


@settings(max_examples=150, deadline=None)
@given(arguments())
def test_malformed_arguments_give_a_config_error_or_a_correct_result(args):
    try:
        out = localization_from_maps(**args)
    except ConfigError:
        return
    maps = np.asarray(args["maps"])
    assert out["predictor"].tolist() == list(range(maps.shape[1] if maps.ndim == 3 else 1))
    assert (out["n_images"] == len(maps)).all()
    assert out[["maxboxacc_v2", "inbox_mass", "chance_mass", "pointing"]].stack().between(0, 1 + 1e-6).all()  # float32 maps


@pytest.mark.parametrize("name", ["cls", "gap"])
def test_probe_without_predictors(setup, name):
    tokens, _, boxes = setup
    with pytest.raises(ValueError, match="no attention predictors"):
        localization(probes.build(name, 16, 3), tokens, BoxedSet(boxes))


def test_tokens_and_dataset_must_match(setup):
    tokens, probe, boxes = setup
    with pytest.raises(ValueError, match="12"):
        localization(probe, tokens, BoxedSet(boxes[:5]))


def test_the_meter_upsamples_in_chunks_and_keeps_its_curves(setup):
    tokens, probe, boxes = setup
    meter = Localization(thresholds=np.arange(0, 1, 0.1), chunk_size=3)
    df = measure(probe, tokens, BoxedSet(boxes), [meter], batch_size=8)
    ref, ref_curves = summary_and_curves(
        collect_attention(probe, tokens), list(boxes), GRID, SIZE, thresholds=np.arange(0, 1, 0.1)
    )
    assert meter.meter.n == 12
    cols = ["maxboxacc_v2", "maxboxacc_iou50", "best_tau_iou50", "inbox_mass", "chance_mass", "pointing", "n_images"]
    np.testing.assert_allclose(df[cols].to_numpy(float), ref[cols].to_numpy(float), rtol=1e-6)
    np.testing.assert_allclose(meter.curves()["box_acc"], ref_curves["box_acc"])
    with pytest.raises(ConfigError, match="chunk_size must be an integer >= 1"):
        Localization(chunk_size=0)
    with pytest.raises(ValueError, match="has not started"):
        Localization().summary()


# --- constant maps, flat regions ---------------------------------------------------------


def random_boxes(rng, n, size, large):
    """n GT boxes inside a size x size image: small (1/8 to 1/3 of a side) or large (0.6 to 1)."""
    lo, hi = (size * 6 // 10, size + 1) if large else (max(2, size // 8), size // 3 + 1)
    w, h = rng.integers(lo, hi, n), rng.integers(lo, hi, n)
    x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
    return [np.array([a, b, a + c, b + d]) for a, b, c, d in zip(x0, y0, w, h)]


@pytest.mark.parametrize("convention", ["epviz", "wsol"])
@pytest.mark.parametrize("large", [False, True], ids=["small_boxes", "large_boxes"])
@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("side", [2, 3, 7, 12, 14, 16, 40])
def test_constant_maps_never_yield_a_box(side, size, large, convention):
    rng = np.random.default_rng(side * 1000 + size)
    n_tok = side * side
    values = np.r_[1 / n_tok, 1.0, 1 / 3, 0.37, 5.0, 1e-3, rng.uniform(1e-4, 1, 14)]
    maps = np.concatenate(
        [
            np.full((1, 1, n_tok), 1 / n_tok, np.float32),  # uniform, float32
            np.repeat(values[:, None, None], n_tok, 2),
        ]
    )  # constant maps of many values
    boxes = random_boxes(rng, len(maps), size, large)
    df, curves = summary_and_curves(maps, boxes, (side, side), size, convention=convention)
    assert df["maxboxacc_v2"].iloc[0] == 0.0
    assert (curves["box_acc"] == 0).all()  # no box at any threshold


@pytest.mark.parametrize("side,size", [(12, 224), (7, 64), (16, 224)])
@pytest.mark.parametrize("background", [0.01, 0.1, 1 / 3])
def test_flat_background_is_not_foreground_at_tau_0(side, size, background):
    # one strong token on a flat background: at tau = 0 only the pixels the token reaches are above
    # the minimum, so the only region is the token's interpolation footprint
    n_tok = side * side
    hot = (side // 2) * side + side // 2
    m = np.full(n_tok, background, np.float32)
    m[hot] = 1.0
    indicator = torch.zeros(1, 1, side, side, dtype=torch.float64)
    indicator.view(-1)[hot] = 1.0
    footprint = F.interpolate(indicator, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy() > 0
    ys, xs = np.nonzero(footprint)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert box[2] - box[0] < size // 2
    df = localization_from_maps(m[None, None], [box], (side, side), size, thresholds=[0.0], deltas=(1.0,))
    assert df["maxboxacc_iou100"].iloc[0] == 1.0


def test_non_constant_maps_keep_their_scores():
    # the expectations of the hand-made maps above, through the default convention
    perfect = token_map(block(3, 6, 2, 5))[None, None]
    assert localization_from_maps(perfect, [BOX], GRID, SIZE)["maxboxacc_v2"].iloc[0] == 1.0
    assert localization_from_maps(perfect, [BOX], GRID, SIZE, convention="epviz")["maxboxacc_v2"].iloc[0] == 1.0
    two = token_map(block(3, 6, 2, 5) + block(0, 2, 6, 8))[None, None]
    assert localization_from_maps(two, [BOX], GRID, SIZE)["maxboxacc_v2"].iloc[0] == 1.0
    far = token_map([(0, 7)])[None, None]
    assert localization_from_maps(far, [np.array([0, 40, 24, 64])], GRID, SIZE)["maxboxacc_v2"].iloc[0] == 0.0


# --- the two conventions: epviz (bilinear, exclusive boxes) and wsol (bicubic, x + w, inclusive IoU) ---


def box_accuracy(maps, boxes, thresholds, deltas, convention):
    """LocalizationMeter(image == grid, one predictor) accuracy per (tau, delta)."""
    meter = LocalizationMeter(1, maps.shape[1:], maps.shape[1:], thresholds, deltas, convention=convention)
    meter.update(maps.reshape(len(maps), 1, -1), boxes)
    return meter.accuracy()[0]


def test_box_and_iou_conventions_by_hand():
    # image == grid: no interpolation, so only the box convention differs
    inner = np.zeros((8, 8))
    inner[3:6, 2:5] = 1.0  # columns 2..4, rows 3..5: tightest exclusive box (2, 3, 5, 6)
    gt = np.array([2, 3, 4, 5])
    # epviz: region area 3*3 = 9, GT area 2*2 = 4, intersection 4 -> IoU 4/9
    # wsol: region (2, 3, 2+3, 3+3) inclusive 4*4 = 16, GT inclusive 3*3 = 9, intersection 9 -> 9/16
    for convention, iou in (("epviz", 4 / 9), ("wsol", 9 / 16)):
        acc = box_accuracy(inner[None], [gt], [0.5], (iou, iou + 1e-9), convention)
        assert acc.tolist() == [[1.0, 0.0]], convention
    edge = np.zeros((8, 8))
    edge[0:2, 5:8] = 1.0  # touches the right edge: wsol clips x + w = 8 to the last pixel, 7
    gt = np.array([5, 0, 7, 1])
    # epviz: region (5, 0, 8, 2) area 6, GT area 2, intersection 2 -> 1/3
    # wsol: region (5, 0, 7, 2) inclusive 3*3 = 9, GT inclusive 3*2 = 6, intersection 3*2 = 6 -> 2/3
    for convention, iou in (("epviz", 1 / 3), ("wsol", 2 / 3)):
        acc = box_accuracy(edge[None], [gt], [0.5], (iou, iou + 1e-9), convention)
        assert acc.tolist() == [[1.0, 0.0]], convention


def interpolation_weights(n_in, n_out, mode):
    """(n_out, n_in) weights of half-pixel bilinear or cubic-convolution (a = -0.75) resampling."""
    scale, weights = n_in / n_out, np.zeros((n_out, n_in))
    for i in range(n_out):
        s = (i + 0.5) * scale - 0.5
        if mode == "bilinear":
            s = max(s, 0.0)
            f = int(np.floor(s))
            weights[i, f] += 1 - (s - f)
            weights[i, min(f + 1, n_in - 1)] += s - f
            continue
        f = int(np.floor(s))
        for k in (-1, 0, 1, 2):
            x, a = abs(s - (f + k)), -0.75
            v = (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
            weights[i, min(max(f + k, 0), n_in - 1)] += v
    return weights


def reference_curves(maps, boxes, grid, size, thresholds, deltas, mode, inclusive):
    """MaxBoxAccV2 curves from numpy resampling, skimage regions and explicit IoU formulas."""
    wy, wx = interpolation_weights(grid[0], size, mode), interpolation_weights(grid[1], size, mode)
    correct = np.zeros((len(thresholds), len(deltas)))
    one = 1 if inclusive else 0
    for m, gts in zip(maps, boxes):
        s = wy @ m.reshape(grid) @ wx.T
        s = (s - s.min()) / (s.max() - s.min())
        for t, tau in enumerate(thresholds):
            best = 0.0
            for region in regionprops(label(s > tau, connectivity=2)):
                y0, x0, y1, x1 = region.bbox
                if inclusive:
                    x1, y1 = min(x1, size - 1), min(y1, size - 1)
                for gx0, gy0, gx1, gy1 in np.atleast_2d(gts):
                    inter = max(0, min(x1, gx1) - max(x0, gx0) + one) * max(0, min(y1, gy1) - max(y0, gy0) + one)
                    union = (x1 - x0 + one) * (y1 - y0 + one) + (gx1 - gx0 + one) * (gy1 - gy0 + one) - inter
                    best = max(best, inter / union)
            correct[t] += best >= np.asarray(deltas)
    return correct / len(maps)


def test_the_conventions_differ_in_upsampling_and_box_only():
    rng = np.random.default_rng(1)
    peak = np.full((4, 4), 0.1)
    peak[1, 1] = 1.0  # a known map: bicubic overshoots around the peak, bilinear does not
    logits = rng.normal(size=(5, 4, 4)) * 2
    maps = np.concatenate([peak[None], np.exp(logits)]).reshape(6, 16)
    boxes = [
        np.array([0, 0, 9, 9]),
        np.array([2, 3, 20, 18]),
        np.array([[0, 0, 31, 12], [10, 10, 30, 30]]),
        np.array([5, 5, 15, 28]),
        np.array([1, 1, 31, 31]),
        np.array([16, 0, 32, 16]),
    ]
    thresholds, deltas = np.arange(0, 1, 0.05), (0.3, 0.5, 0.7)
    got = {}
    for convention in ("epviz", "wsol"):
        meter = LocalizationMeter(1, (4, 4), 32, thresholds, deltas, convention=convention)
        meter.update(maps[:, None], boxes)
        got[convention] = meter.accuracy()[0]
    np.testing.assert_allclose(got["epviz"], reference_curves(maps, boxes, (4, 4), 32, thresholds, deltas, "bilinear", False))
    np.testing.assert_allclose(got["wsol"], reference_curves(maps, boxes, (4, 4), 32, thresholds, deltas, "bicubic", True))
    # each of the two respects changes the curves on its own
    mixed = [
        reference_curves(maps, boxes, (4, 4), 32, thresholds, deltas, mode, inclusive)
        for mode, inclusive in (("bicubic", False), ("bilinear", True))
    ]
    for curves in mixed:
        assert not np.array_equal(curves, got["epviz"]) and not np.array_equal(curves, got["wsol"])


def test_bicubic_and_bilinear_on_a_known_map():
    # the peak map of 4x4 tokens at 32 px: at tau = 0 bilinear keeps only the peak's footprint,
    # bicubic's negative lobes become the minimum, so the flat background is above it
    peak = np.full(16, 0.1)
    peak[5] = 1.0
    full = np.array([0, 0, 32, 32])
    epviz = localization_from_maps(peak[None, None], [full], (4, 4), 32, thresholds=[0.0], deltas=(0.9,))
    wsol = localization_from_maps(peak[None, None], [full], (4, 4), 32, thresholds=[0.0], deltas=(0.9,), convention="wsol")
    assert epviz["maxboxacc_iou90"].iloc[0] == 0.0 and wsol["maxboxacc_iou90"].iloc[0] == 1.0


@pytest.mark.parametrize("call", ["meter", "from_maps", "probe", "Localization"])
def test_unknown_convention_names_the_choices(setup, call):
    tokens, probe, boxes = setup
    with pytest.raises(ValueError, match=r"convention must be one of \['epviz', 'wsol'\]"):
        if call == "meter":
            LocalizationMeter(1, GRID, SIZE, convention="cv2")
        elif call == "from_maps":
            localization_from_maps(np.full((1, 1, N), 1 / N), [BOX], GRID, SIZE, convention="cv2")
        elif call == "probe":
            localization(probe, tokens, BoxedSet(boxes), convention="cv2")
        else:
            Localization(convention="cv2")


def test_the_probe_path_and_the_meter_pass_the_convention(setup):
    tokens, probe, boxes = setup
    maps = collect_attention(probe, tokens)
    ref = localization_from_maps(maps, list(boxes), GRID, SIZE, convention="wsol")
    df = localization(probe, tokens, BoxedSet(boxes), batch_size=5, convention="wsol")
    np.testing.assert_allclose(df["maxboxacc_v2"], ref["maxboxacc_v2"])
    meter = Localization(convention="wsol")
    measured = measure(probe, tokens, BoxedSet(boxes), [meter], batch_size=8)
    np.testing.assert_allclose(measured["maxboxacc_v2"], ref["maxboxacc_v2"])
    assert meter.meter.convention == "wsol"
    default = localization_from_maps(maps, list(boxes), GRID, SIZE)
    assert not np.allclose(
        default[["maxboxacc_iou30", "maxboxacc_iou50", "maxboxacc_iou70"]],
        ref[["maxboxacc_iou30", "maxboxacc_iou50", "maxboxacc_iou70"]],
    )


def test_intervals_of_precomputed_maps_are_the_bootstrap_over_images():
    from epviz.analysis.intervals import bootstrap_mean

    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(16, 0.3), size=(80, 3))  # 80 images, 3 predictors, 4x4 tokens
    boxes = [np.array([8 * (i % 3), 8, 8 * (i % 3) + 16, 24]) for i in range(80)]
    plain = localization_from_maps(maps, boxes, (4, 4), 32)
    table = localization_from_maps(maps, boxes, (4, 4), 32, intervals=True)
    assert "maxboxacc_v2_lo" not in plain.columns
    np.testing.assert_allclose(table["inbox_mass"], plain["inbox_mass"])
    for column in ("maxboxacc_v2", "inbox_mass", "pointing"):
        lo, hi = table[f"{column}_lo"], table[f"{column}_hi"]
        assert (lo <= table[column] + 1e-12).all() and (table[column] <= hi + 1e-12).all() and (hi > lo).all(), column
    meter = LocalizationMeter(3, (4, 4), 32, records=True)
    meter.update(maps, boxes, range(80))
    mass = meter.image_records()["mass"]
    for j in range(3):  # the in-box mass interval is that of the per-image masses, same resamples
        expected = bootstrap_mean(mass[:, j])
        assert table.loc[j, "inbox_mass_lo"] == pytest.approx(expected.lo) and table.loc[j, "inbox_mass_hi"] == pytest.approx(
            expected.hi
        )


# --- lift: mass on the object above chance ------------------------------------------------


def box_mask(box=BOX):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    return mask


def test_lift_is_zero_for_the_uniform_map_and_one_for_all_mass_on_the_object():
    maps = np.stack([np.full(N, 1 / N), token_map(block(3, 6, 2, 5)), token_map([(0, 0)])])[None]  # (1, 3, N)
    row = localization_from_maps(maps, [BOX], GRID, SIZE, masks=[box_mask()]).set_index("predictor")
    np.testing.assert_allclose(row["mask_lift"], [0, 1, -9 / 55], atol=1e-12)  # c = 9/64: (0 - c) / (1 - c)
    np.testing.assert_allclose(row["box_lift"], row["mask_lift"], atol=1e-12)  # mask == box here
    np.testing.assert_allclose(row["mask_chance"], 9 / 64)
    assert abs(row.loc[0, "mask_lift_px"]) < 1e-12  # bilinear keeps a constant map constant
    assert 0.5 < row.loc[1, "mask_lift_px"] < 1  # at pixels, the upsampled map spills past the object's edge


def test_lift_sees_mass_where_maxboxacc_only_sees_order():
    """A monotone transform keeps MaxBoxAccV2 and pointing, and takes lift to about 0."""
    sharp = token_map(block(3, 6, 2, 5)) * 0.9 + 0.1 / N
    flat = np.exp(1e-3 * np.log(sharp))  # same order, nearly uniform
    masks = [box_mask()]
    a = localization_from_maps(sharp[None, None], [BOX], GRID, SIZE, masks=masks).iloc[0]
    b = localization_from_maps((flat / flat.sum())[None, None], [BOX], GRID, SIZE, masks=masks).iloc[0]
    assert a["maxboxacc_v2"] == b["maxboxacc_v2"] == 1.0 and a["pointing"] == b["pointing"] == 1.0
    assert a["mask_lift"] > 0.85 and abs(b["mask_lift"]) < 0.01


def test_lift_has_bootstrap_intervals_and_the_mask_columns_need_masks():
    rng = np.random.default_rng(0)
    maps = rng.random((20, 2, N))
    boxes = [BOX] * 20
    with_masks = localization_from_maps(maps, boxes, GRID, SIZE, masks=[box_mask()] * 20, intervals=True)
    for column in ("mask_lift", "mask_lift_px", "box_lift"):
        assert (with_masks[f"{column}_lo"] <= with_masks[column]).all() and (
            with_masks[column] <= with_masks[f"{column}_hi"]
        ).all()
    without = localization_from_maps(maps, boxes, GRID, SIZE)
    assert "mask_lift" not in without and "box_lift" in without
    meter = LocalizationMeter(2, GRID, SIZE)
    meter.update(maps[:2], boxes[:2], masks=[box_mask()] * 2)
    with pytest.raises(ConfigError, match="masks, or none"):
        meter.update(maps[2:4], boxes[2:4])
    with pytest.raises(ConfigError, match="covers all"):
        LocalizationMeter(2, GRID, SIZE).update(maps[:1], boxes[:1], masks=[np.ones((SIZE, SIZE), bool)])


def test_the_localization_meter_reads_the_canvases_masks():
    from epviz.data import ClutteredFashionMNIST

    canvases = ClutteredFashionMNIST("test", 6, seed=0)
    rng = np.random.default_rng(0)
    tokens = TokenSet(
        patch=torch.from_numpy(rng.normal(size=(6, N, 16)).astype(np.float32)),
        prefix=None,
        labels=canvases.labels,
        grid=GRID,
        origin=TokenOrigin("toy", 0, 16),
    )
    probe = probes.build("ep", 16, 10, num_queries=2, seed=0, grid=GRID).eval()
    table = measure(probe, tokens, canvases, [Localization()])
    maps = collect_attention(probe, tokens)
    expected = localization_from_maps(maps, canvases.boxes.numpy(), GRID, SIZE, masks=list(canvases.masks.numpy()))
    np.testing.assert_allclose(table["mask_lift"], expected["mask_lift"], rtol=1e-6)
