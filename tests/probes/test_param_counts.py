"""Pooling parameter counts at ViT-B shape (D=768, C=1000) against the method's table."""

import pytest

import epviz.probes as probes

# method.md section 3; "pool params" = trainable parameters minus the classifier head.
POOL_PARAMS = {
    "cls": 0,
    "gap": 0,
    "ep": 614_400,
    "ep_all": 614_400,
    "mhca": 2_360_064,
    "aim": 1_180_416,
    "jepa": 7_088_640,
    "siglip": 7_085_568,
    "clip": 2_515_200,
    "cae": 2_366_976,
    "coca": 1_036_032,
    "cait": 7_091_712,
    "dinovit": 7_085_568,
    "simpool": 1_181_184,
    "esimpool": 1_536,
    "abmilp": 2_951_425,
    "dolg": 592_897,
    "cbam": 73_828,
}
HEADS = {
    "mhca": 12,
    "aim": 16,
    "jepa": 16,
    "siglip": 8,
    "clip": 4,
    "cae": 8,
    "coca": 8,
    "cait": 4,
    "dinovit": 8,
    "simpool": 1,
    "esimpool": 12,
    "ep": 32,
    "ep_all": 32,
    "abmilp": 1,
    "dolg": 1,
    "cbam": 1,
    "cls": 0,
    "gap": 0,
}


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_table_covers_every_family_of_epviz():
    families = [n for n in probes.available(variants=False) if probes.probe_class(n).__module__.startswith("epviz.")]
    assert sorted(POOL_PARAMS) == families


@pytest.mark.parametrize("name", sorted(POOL_PARAMS))
def test_pool_params_at_vit_b(name):
    probe = probes.build(name, 768, 1000)
    assert trainable(probe) - trainable(probe.head) == POOL_PARAMS[name]
    assert trainable(probe.norm) == 0
    assert trainable(probe.head) == probe.width * 1000 + 1000
    assert probe.num_predictors == HEADS[name]


def test_totals():
    assert trainable(probes.build("ep", 768, 1000, num_queries=32)) == 1_383_400
    assert trainable(probes.build("cls", 768, 1000)) == 769_000
    assert trainable(probes.build("ep", 768, 1000, num_queries=32, d_out=2)) == 704_488
    # M*D + D*D_o + D_o*C + C in general
    for m, d_out in [(8, 1), (16, 4), (64, 2)]:
        d_o = 768 // d_out
        assert trainable(probes.build("ep", 768, 1000, num_queries=m, d_out=d_out)) == m * 768 + 768 * d_o + d_o * 1000 + 1000
