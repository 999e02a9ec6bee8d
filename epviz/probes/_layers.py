"""Small tensor helpers shared by the probe families: heads, uniform rows, one-query attention."""

from __future__ import annotations

import torch

__all__ = ["divisors", "head_slices", "merge_heads", "query_weights", "resolve_heads", "split_heads", "uniform_rows"]


def divisors(n: int) -> list[int]:
    """All positive divisors of `n`, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_heads(dim: int, heads: int | None, preferred: int, name: str) -> int:
    """The number of attention heads to use.

    Args:
        dim: Width the heads split.
        heads: An explicit choice, or None for the default.
        preferred: The reference implementation's head count, used when it divides `dim`;
            otherwise the largest divisor of `dim` below it.
        name: Probe name, for error messages.

    Raises:
        ValueError: An explicit `heads` does not divide `dim`.
    """
    if heads is None:
        return max(d for d in divisors(dim) if d <= max(1, preferred))
    heads = int(heads)
    if heads < 1 or dim % heads:
        valid = [d for d in divisors(dim) if d <= 64]
        raise ValueError(f"probe '{name}': heads={heads} must divide the token width D={dim}; valid choices include {valid}")
    return heads


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Reshape (B, L, H*d) to (B, H, L, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def head_slices(width: int, heads: int) -> list[slice | None]:
    """The columns [h*d, (h+1)*d) of a width-`width` feature that head h produces (d = width / heads)."""
    d = width // heads
    return [slice(h * d, (h + 1) * d) for h in range(heads)]


def uniform_rows(attn: torch.Tensor, rows: frozenset[int], axis: int = 1) -> torch.Tensor:
    """Replace the distributions at positions `rows` of `axis` by the uniform one.

    Args:
        attn: Attention weights whose last axis is the key axis (sums to 1).
        rows: Predictor indices along `axis` to make uniform.
        axis: The predictor axis.
    """
    if not rows:
        return attn
    mask = torch.zeros(attn.shape[axis], dtype=torch.bool, device=attn.device)
    mask[sorted(rows)] = True
    shape = [1] * attn.ndim
    shape[axis] = attn.shape[axis]
    fill = torch.full((), 1.0 / attn.shape[-1], dtype=attn.dtype, device=attn.device)
    return torch.where(mask.view(shape), fill, attn)


def query_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention weights of one query per head over L keys, shape (B, H, L).

    Args:
        q: Queries (B or 1, H, 1, d), not yet scaled.
        k: Keys (B, H or 1, L, d).
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, 1, L)
    return scores.squeeze(2).softmax(dim=-1)


def merge_heads(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The heads' weighted values concatenated, shape (B, H * d_v).

    Args:
        attn: Weights (B, H, L) from :func:`query_weights`.
        v: Values (B, H or 1, L, d_v).
    """
    out = (attn.unsqueeze(2) @ v).squeeze(2)  # (B, H, d_v)
    return out.reshape(out.shape[0], -1)
