"""K heads of one probe family trained as one module: parameters and buffers stacked on a leading K axis.

A grid of K configurations (learning rates x weight decays x initial seeds) of one probe is one
:class:`HeadStack`: one forward pass gives the (K, B, C) logits of every head on a batch, one backward
pass every head's gradients (the heads share no parameter, so the gradient of the sum of their losses
is each head's own), and :mod:`~epviz.training.optim` updates them with per-head factors. Each head
keeps its own BatchNorm statistics (rows of the stacked running buffers).

How the forward pass runs (``mode``):

* ``"hand"``: the family's own stacked form (:meth:`~epviz.probes.Probe.stacked_logits`; EP: one GEMM
  for all K x M query scores, one bmm for the pooling, one batched einsum for the sliced value
  projection, BatchNorm over K x D_o channels).
* ``"vmap"``: ``torch.func.vmap`` over ``functional_call`` of one head, exact for every registered
  family; the default on CUDA, where one small head is launch-bound.
* ``"loop"``: ``functional_call`` of each head's slice of the stacked state in turn, then one backward;
  the default on CPU for families without a hand-stacked form (measured: vmap there is about 1.5x the
  loop, ``benchmarks/head_grid.py``), and the form distributed runs use (their synced BatchNorm is not
  batched by vmap).

``"auto"`` picks ``"hand"`` where the family has it, else ``"vmap"`` on CUDA and ``"loop"`` elsewhere.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from epviz.errors import ConfigError
from epviz.probes import Probe

__all__ = ["MODES", "HeadStack"]

MODES = ("auto", "hand", "vmap", "loop")


class HeadStack:
    """K heads of one family and configuration, stacked; see the module docstring.

    Args:
        heads: The heads (same class and build options; initial weights may differ).
        device: Where the stacked state lives.
        mode: One of :data:`MODES`.

    Raises:
        ConfigError: No heads, heads of different families or options, or an unknown mode.
    """

    def __init__(self, heads: Sequence[Probe], device: torch.device, mode: str = "auto") -> None:
        if not heads:
            raise ConfigError("a head stack needs at least one head: pass a non-empty grid")
        first = heads[0]
        for h in heads[1:]:
            if type(h) is not type(first) or h.config != first.config:
                raise ConfigError(
                    f"one stack trains one probe family with one set of build options, got {first.config} and {h.config}: "
                    "train different probes in separate grids"
                )
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.template = copy.deepcopy(first).to(device)
        self.params = {
            name: torch.stack([dict(h.named_parameters())[name].detach() for h in heads])
            .to(device)
            .requires_grad_(p.requires_grad)
            for name, p in first.named_parameters()
        }
        self.buffers = {
            name: torch.stack([dict(h.named_buffers())[name] for h in heads]).to(device) for name, _ in first.named_buffers()
        }
        self.mode = self._resolve(mode, device)
        self._vmapped: nn.Module | None = None
        self._leaves: list[dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0] if self.params else 0

    def _resolve(self, mode: str, device: torch.device) -> str:
        hand = self.template.has_stacked_form()
        if mode == "hand" and not hand:
            raise ConfigError(f"probe '{self.template.name}' has no hand-stacked form: use mode='vmap' or 'loop'")
        if mode != "auto":
            return mode
        if hand:
            return "hand"
        return "vmap" if device.type == "cuda" else "loop"

    def train(self, mode: bool = True) -> None:
        """Training (batch statistics) or evaluation mode for every head."""
        self.template.train(mode)
        if self._vmapped is not None:
            self._vmapped.train(mode)

    def parts(self) -> list[slice]:
        """The rows one forward pass covers: all of them, or one head at a time in ``"loop"`` mode, so that only
        one head's activations are alive between its forward and backward pass."""
        return [slice(k, k + 1) for k in range(len(self))] if self.mode == "loop" else [slice(0, len(self))]

    def __call__(self, patch: torch.Tensor, prefix: torch.Tensor | None, rows: slice = slice(None)) -> torch.Tensor:
        """Logits of the heads `rows` (default all), shape (K, B, C)."""
        buffers = {n: b[rows] for n, b in self.buffers.items()}  # views: BatchNorm statistics reach the stack
        if self.mode == "loop":
            leaves = self._head_leaves()[rows]
            return torch.stack(
                [
                    functional_call(self.template, (p, {n: b[k] for n, b in buffers.items()}), (patch, prefix))
                    for k, p in enumerate(leaves)
                ]
            )
        params = {n: p[rows] for n, p in self.params.items()}  # views: gradients reach the stacked leaves
        if self.mode == "hand":
            return self.template.stacked_logits({**params, **buffers}, patch, prefix)
        module = self._vmap_module()  # "vmap"
        return vmap(
            lambda p, b, x, y: functional_call(module, (p, b), (x, y)), in_dims=(0, 0, None, None), randomness="different"
        )(params, buffers, patch, prefix)

    def _head_leaves(self) -> list[dict[str, torch.Tensor]]:
        """Loop mode: each head's parameters as leaves of their own that share the stacked storage.

        Backward through a slice of one stacked leaf would write a zero-filled gradient of the whole stack per
        head (K^2 work a step); separate leaves get their own gradients, gathered once a step (:meth:`gather_grads`).
        """
        if self._leaves is None:
            self._leaves = [
                {n: p.detach()[k].requires_grad_(p.requires_grad) for n, p in self.params.items()} for k in range(len(self))
            ]
        return self._leaves

    def gather_grads(self) -> None:
        """Loop mode: stack the heads' gradients into the stacked parameters' ``.grad`` (for the optimiser)."""
        if self._leaves is None:
            return
        for name, p in self.params.items():
            grads = [leaf[name].grad for leaf in self._leaves]
            if any(g is not None for g in grads):
                p.grad = torch.stack([torch.zeros_like(p[0]) if g is None else g for g in grads])

    def zero_grad(self) -> None:
        """Drop every gradient (the stacked ones and, in loop mode, each head's)."""
        for p in self.params.values():
            p.grad = None
        for leaf in self._leaves or []:
            for t in leaf.values():
                t.grad = None

    def _vmap_module(self) -> nn.Module:
        """The template with its BatchNorm layers computing in fp32 (vmap's BatchNorm rule refuses bf16 input with fp32 statistics)."""
        if self._vmapped is None:
            module = copy.deepcopy(self.template)
            for sub in module.modules():
                if isinstance(sub, _BatchNorm):
                    sub.__class__ = _fp32(type(sub))
            module.train(self.template.training)
            self._vmapped = module
        return self._vmapped

    def state(self) -> dict[str, torch.Tensor]:
        """Every stacked parameter and buffer (detached), by name."""
        return {**{n: p.detach() for n, p in self.params.items()}, **self.buffers}

    @torch.no_grad()
    def keep(self, index: torch.Tensor) -> None:
        """Keep only the heads `index` (a smaller stack costs less per step); parameters become new leaves."""
        self.params = {n: p[index].detach().clone().requires_grad_(p.requires_grad) for n, p in self.params.items()}
        self.buffers = {n: b[index].clone() for n, b in self.buffers.items()}
        self._leaves = None

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the stacked state with `state` (same names and shapes)."""
        for n, t in self.state().items():
            t.copy_(state[n])

    def head(self, state: dict[str, torch.Tensor], k: int) -> Probe:
        """Head `k` of a stacked `state` as a probe of its own, in eval mode."""
        probe = copy.deepcopy(self.template)
        probe.load_state_dict({n: t[k] for n, t in state.items()})
        return probe.eval()


def _fp32(cls: type[_BatchNorm]) -> type[_BatchNorm]:
    """`cls` computing on fp32 input."""
    return type(f"Fp32{cls.__name__}", (cls,), {"forward": lambda self, input: cls.forward(self, input.float())})
