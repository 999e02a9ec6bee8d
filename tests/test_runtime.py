"""Device and precision choices: "auto" precision is bf16 only where the device computes it natively."""

import pytest
import torch

from epviz import runtime
from epviz.errors import ConfigError


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert runtime.resolve_precision(cpu, "auto") == expected
    assert runtime.resolve_precision(cpu, "bf16") == "bf16" and runtime.resolve_precision(cpu, "fp32") == "fp32"
    with runtime.autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="precision must be one of"):
        runtime.resolve_precision(torch.device("cpu"), "fp16")
