"""Trivial maps and their localization scores: the chance lines of every localization figure."""

import math

import numpy as np
import pandas as pd
import pytest

from epviz.analysis import map_entropy
from epviz.analysis.baselines import (
    CENTRE_PRIOR,
    MATCHED,
    UNIFORM,
    centre_prior_maps,
    localization_baselines,
    matched_entropy_baselines,
    matched_entropy_maps,
    temperature_for_entropy,
    uniform_maps,
)

GRID, SIZE = (8, 8), 64
STEP = np.round(np.arange(0, 1, 0.04), 2)  # coarse thresholds keep the tests fast


def random_boxes(n: int, seed: int, centred: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        side = int(rng.integers(16, 33))
        if centred:
            x0 = y0 = (SIZE - side) // 2
        else:
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
        boxes.append(np.array([x0, y0, x0 + side, y0 + side]))
    return boxes


def test_uniform_map_scores_the_chance_mass_and_no_box():
    boxes = random_boxes(30, 0)
    table = localization_baselines(boxes, GRID, SIZE, thresholds=STEP).set_index("baseline")
    area = np.mean([(b[2] - b[0]) * (b[3] - b[1]) / SIZE**2 for b in boxes])
    assert table.loc[UNIFORM, "inbox_mass"] == pytest.approx(area, abs=1e-6)
    assert table.loc[UNIFORM, "chance_mass"] == pytest.approx(area, abs=1e-9)
    assert table.loc[UNIFORM, "maxboxacc_v2"] == 0.0, "a constant map yields no box at any threshold"
    assert table.loc[UNIFORM, "entropy_norm"] == pytest.approx(1.0)
    assert np.isnan(table.loc[UNIFORM, "pointing"]), "every token ties for the argmax of a constant map"
    assert MATCHED not in table.index, "no target entropy: no random baseline"
    assert list(table.reset_index().columns[:5]) == ["baseline", "backbone", "layer", "probe", "seed"]


def test_centre_prior_beats_uniform_on_centred_boxes_and_is_documented_gaussian():
    prior = centre_prior_maps(3, GRID)
    assert prior.shape == (3, 64) and np.allclose(prior.sum(-1), 1)
    grid = prior[0].reshape(GRID)
    assert np.allclose(grid, grid[::-1]) and np.allclose(grid, grid.T), "symmetric about the image centre"
    # sigma is a quarter of the side: the ratio between the centre patch and its neighbour in patch units
    c = np.arange(8) + 0.5 - 4
    assert grid[3, 3] / grid[3, 2] == pytest.approx(math.exp(-0.5 * (c[3] ** 2 - c[2] ** 2) / 2.0**2))
    table = localization_baselines(random_boxes(30, 1, centred=True), GRID, SIZE, thresholds=STEP, context={"backbone": "toy"})
    scores = table.set_index("baseline")
    assert scores.loc[CENTRE_PRIOR, "inbox_mass"] > scores.loc[UNIFORM, "inbox_mass"] + 0.1
    assert scores.loc[CENTRE_PRIOR, "pointing"] == 1.0 and scores.loc[CENTRE_PRIOR, "maxboxacc_v2"] > 0.5
    assert scores.loc[CENTRE_PRIOR, "sigma_fraction"] == 0.25
    assert (table["backbone"] == "toy").all()


@pytest.mark.parametrize("target", [0.3, 0.75, 0.97])
def test_matched_entropy_maps_hit_their_target(target):
    maps, temperature = matched_entropy_maps(200, 64, target, seed=3)
    assert maps.shape == (200, 64) and np.allclose(maps.sum(-1), 1)
    assert abs(map_entropy(maps).mean() / math.log(64) - target) < 0.01
    again, t2 = matched_entropy_maps(200, 64, target, seed=3)
    assert np.array_equal(maps, again) and temperature == t2, "seeded"
    assert not np.array_equal(maps, matched_entropy_maps(200, 64, target, seed=4)[0])


def test_matched_entropy_edge_cases():
    maps, temperature = matched_entropy_maps(5, 16, 1.0)
    assert np.allclose(maps, 1 / 16) and temperature == math.inf
    maps, temperature = matched_entropy_maps(5, 16, 0.0)
    assert ((maps == 1).sum(-1) == 1).all() and temperature == 0.0
    # close to 1, the maps stay random (their argmax is the noise's), not uniform
    maps, temperature = matched_entropy_maps(50, 16, 0.99995, seed=1)
    assert temperature < math.inf and (maps.argmax(-1) == np.random.default_rng(1).standard_normal((50, 16)).argmax(-1)).all()
    assert len(np.unique(maps.astype(np.float32).argmax(-1))) > 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        matched_entropy_maps(5, 16, 1.2)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        temperature_for_entropy(np.zeros((2, 4)) + np.arange(4), 1.0)
    # a higher temperature spreads the maps: the bisection's monotonicity
    logits = np.random.default_rng(0).standard_normal((50, 32))
    assert temperature_for_entropy(logits, 0.5) < temperature_for_entropy(logits, 0.9)


def test_localization_baselines_random_row_and_dataset_input():
    boxes = random_boxes(40, 2)

    class Stand:  # a GroundTruthBoxes stand-in: boxes and the image size
        def __init__(self):
            self.boxes, self.image_size = np.stack(boxes), SIZE

        def __len__(self):
            return len(self.boxes)

    table = localization_baselines(Stand(), GRID, target_entropy=0.8, thresholds=STEP, index=range(20))
    assert table["baseline"].tolist() == [UNIFORM, CENTRE_PRIOR, MATCHED]
    assert (table["n_images"] == 20).all()
    random = table.set_index("baseline").loc[MATCHED]
    assert abs(random["entropy_norm"] - 0.8) < 0.01 and random["target_entropy_norm"] == 0.8 and random["map_seed"] == 0
    assert 0 < random["temperature"] < math.inf
    # the same images given as a list score the same
    same = localization_baselines(boxes[:20], GRID, SIZE, target_entropy=0.8, thresholds=STEP)
    pd.testing.assert_series_equal(same["inbox_mass"], table["inbox_mass"])
    with pytest.raises(ValueError, match="image_size"):
        localization_baselines(boxes, GRID)


def test_random_maps_point_at_chance():
    # the argmax of i.i.d. noise is a uniformly random patch: the pointing chance is the share of patch centres in the box
    boxes = random_boxes(400, 5)
    centres = (np.arange(8) + 0.5) * 8
    inside = [
        ((b[0] <= centres[None, :]) & (centres[None, :] < b[2]) & (b[1] <= centres[:, None]) & (centres[:, None] < b[3])).mean()
        for b in boxes
    ]
    table = localization_baselines(boxes, GRID, SIZE, target_entropy=0.9, thresholds=(0.5,)).set_index("baseline")
    assert abs(table.loc[MATCHED, "pointing"] - np.mean(inside)) < 0.07


def test_matched_entropy_baselines_one_row_per_probe_with_its_mean_entropy():
    table = pd.DataFrame(
        dict(
            backbone=["a"] * 4 + ["b"] * 2,
            probe=["ep"] * 2 + ["mhca"] * 2 + ["ep"] * 2,
            predictor=[0, 1, 0, 1, 0, 1],
            entropy_norm=[0.9, 0.96, 0.5, 0.6, 0.99, 0.97],
        )
    )
    out = matched_entropy_baselines(table, random_boxes(30, 3), GRID, SIZE, thresholds=STEP)
    assert out[["backbone", "probe"]].values.tolist() == [["a", "ep"], ["a", "mhca"], ["b", "ep"]]
    assert (out["baseline"] == MATCHED).all()
    np.testing.assert_allclose(out["target_entropy_norm"], [0.93, 0.55, 0.98])
    assert (abs(out["entropy_norm"] - out["target_entropy_norm"]) < 0.01).all()
    assert out["inbox_mass"].between(0, 1).all() and (out["map_seed"] == 0).all()
    # peakier maps at the same noise: a lower temperature
    assert (
        out.set_index("probe").loc["mhca", "temperature"] < out.set_index(["backbone", "probe"]).loc[("a", "ep"), "temperature"]
    )
    with pytest.raises(ValueError, match="entropy_norm"):
        matched_entropy_baselines(table.drop(columns="entropy_norm"), random_boxes(3, 0), GRID, SIZE)


def test_uniform_maps_shape():
    assert np.allclose(uniform_maps(2, 5), 0.2) and uniform_maps(2, 5).shape == (2, 5)


def test_an_untrained_probe_localizes_where_the_tokens_set_the_object_apart():
    """Maps uniform to three decimals still have an order; MaxBoxAccV2 reads only that order."""
    from epviz.analysis.baselines import UNTRAINED, untrained_probe_baselines
    from epviz.tokens import TokenSet

    rng = np.random.default_rng(0)
    n, direction = 24, rng.normal(size=32)
    patch = 0.05 * rng.normal(size=(n, 16, 32))
    patch[:, :4] += direction  # the first grid row, the box, stands apart along one direction
    tokens = TokenSet(
        patch=patch.astype(np.float32), prefix=patch[:, :1].astype(np.float32), labels=np.arange(n) % 3, grid=(4, 4)
    )
    boxes = [np.array([0, 0, 32, 8])] * n
    table = untrained_probe_baselines("ep16", tokens, boxes, image_size=32, seeds=(0, 1), thresholds=STEP)
    assert table["baseline"].tolist() == [UNTRAINED] * 2 and table["init_seed"].tolist() == [0, 1]
    assert (table["predictors"] == 16).all()
    assert (table["entropy_norm"] > 0.999).all(), "the untrained maps are near uniform"
    assert np.allclose(table["inbox_mass"], table["chance_mass"], atol=0.01), "and put chance mass in the box"
    # yet every query whose key faces the object's direction boxes it exactly, the others never do
    assert (table["maxboxacc_v2_max"] == 1).all() and (table["maxboxacc_v2_min"] == 0).all()
    assert table["maxboxacc_v2"].between(0.2, 0.8).all()
    again = untrained_probe_baselines("ep16", tokens, boxes, image_size=32, seeds=(0, 1), thresholds=STEP)
    pd.testing.assert_frame_equal(table, again)
    with pytest.raises(ValueError, match="no attention predictors"):
        untrained_probe_baselines("cls", tokens, boxes, image_size=32, seeds=(0,))
    with pytest.raises(ValueError, match="at least one seed"):
        untrained_probe_baselines("ep16", tokens, boxes, image_size=32, seeds=())


def test_untrained_lift_is_zero_and_its_sharpened_order_is_not():
    """The untrained head's maps are uniform to four decimals: lift 0. At the trained head's
    entropy, the same order puts mass on the object: the order-keeping baseline."""
    from epviz.analysis.baselines import UNTRAINED, UNTRAINED_MATCHED, untrained_probe_baselines
    from epviz.tokens import TokenSet

    rng = np.random.default_rng(0)
    n, direction = 24, rng.normal(size=32)
    patch = 0.05 * rng.normal(size=(n, 16, 32))
    patch[:, :4] += direction
    tokens = TokenSet(patch=patch.astype(np.float32), prefix=None, labels=np.arange(n) % 3, grid=(4, 4))
    boxes = [np.array([0, 0, 32, 8])] * n
    table = untrained_probe_baselines(
        "ep16", tokens, boxes, image_size=32, seeds=(0,), thresholds=STEP, target_entropy=0.5
    ).set_index("baseline")
    assert abs(table.loc[UNTRAINED, "box_lift"]) < 0.01
    assert table.loc[UNTRAINED_MATCHED, "entropy_norm"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc[UNTRAINED_MATCHED, "box_lift"] > 0.05
    assert table.loc[UNTRAINED_MATCHED, "pointing"] == table.loc[UNTRAINED, "pointing"], "same order, same argmax"


def test_pixel_salience_finds_the_bright_item_on_the_canvases():
    from epviz.analysis.baselines import SALIENCE, patch_brightness
    from epviz.data import ClutteredFashionMNIST

    canvases = ClutteredFashionMNIST("test", 40, seed=0)
    brightness = patch_brightness(canvases, GRID, range(3))
    expected = canvases.images[:3].double().div(255).mean(1).reshape(3, 8, 8, 8, 8).mean((2, 4)).reshape(3, 64)
    np.testing.assert_allclose(brightness, expected.numpy(), atol=1e-9)
    table = localization_baselines(canvases, GRID, target_entropy=0.8, thresholds=STEP).set_index("baseline")
    assert table.loc[SALIENCE, "entropy_norm"] == pytest.approx(0.8, abs=1e-3)
    assert table.loc[SALIENCE, "mask_lift"] > 0.1, "the item is the bright object by design"
    assert abs(table.loc[UNIFORM, "mask_lift"]) < 1e-9
    assert abs(table.loc[MATCHED, "mask_lift"]) < 0.05, "random placement: chance"
