"""Old values paired into a wider model's shapes (private; see ``generic``).

:func:`grow` takes the variables, their new values or shapes and the jaxpr of one eval-mode
forward pass; :mod:`~optax_multirate.growing._streams` tells it which axes grow together and
how each is read. Along an axis a kernel contracts, the second half of the new slots is the
negated first (``[Z, -Z]``); along any other grown axis it is a copy (``[V; V]``); the old
block goes in front, scaled by variance transfer where a batch norm absorbs the scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from optax_multirate.growing import _rules, _streams
from optax_multirate.growing.widen import _rng

_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)
_ATTENTION = (nn.MultiHeadDotProductAttention, nnx.MultiHeadAttention)


def prechecks(names: Sequence[str], old: Sequence, new: Sequence, types: Mapping) -> None:
    """Clear errors for the layers that cannot grow, found by their type."""
    for name, a, b in zip(names, old, new):
        grown = [ax for ax, (p, q) in enumerate(zip(np.shape(a), b.shape)) if p != q]
        if not grown:
            continue
        parts = tuple(name.split("/"))
        for k in range(len(parts) - 1, 0, -1):
            kind = types.get(parts[:k])
            if kind is not None and issubclass(kind, _NORMS) and k == len(parts) - 1:
                raise ValueError(
                    f"layer {'/'.join(parts[:k])!r} is a {kind.__name__} over a grown axis "
                    f"({name!r} grows {np.shape(a)}->{tuple(b.shape)}): the new units would "
                    "change the statistics it normalizes the old units by; keep the width it "
                    "normalizes (grow other axes) or use a batch norm"
                )
            if kind is not None and issubclass(kind, _ATTENTION) and k == len(parts) - 2:
                if parts[k] in ("query", "key", "value") and len(np.shape(a)) - 1 in grown:
                    raise ValueError(
                        f"layer {'/'.join(parts[:k])!r} is an attention whose head dimension "
                        f"grows ({name!r} grows {np.shape(a)}->{tuple(b.shape)}): the scores "
                        "q.k and their 1/sqrt(head_dim) scale would change; grow the number "
                        "of heads instead (qkv_features and num_heads by the same factor)"
                    )


def _draw(key: jax.Array | None, index: int, shape: tuple, fan_in: int, name: str) -> np.ndarray:
    """New values from shapes only: kernels lecun normal, scales and variances 1, else 0."""
    if fan_in:
        if key is None:
            raise ValueError(
                f"key is needed to draw new entries of {name!r} (or pass the wider model's "
                "initialised variables instead of shapes)"
            )
        z = _rng(key, index).standard_normal(shape)
        return (np.clip(z, -2, 2) / math.sqrt(fan_in) / 0.87962566103423978).astype(np.float32)
    fill = 1.0 if name.rpartition("/")[2] in ("scale", "var") else 0.0
    return np.full(shape, fill, np.float32)


def grow(
    names: list[str],
    params: list[bool],
    old: list[Any],
    new: list[Any],
    closed: Any,
    types: Mapping,
    *,
    key: jax.Array | None,
    rescale: str | None,
    pairing: bool,
    eps: float,
) -> list[Any]:
    """The variables of the wider model: old values paired into the new shapes."""
    prechecks(names, old, new, types)
    shapes_old = [tuple(np.shape(x)) for x in old]
    shapes_new = [tuple(x.shape) for x in new]
    try:
        an = _rules.analyse(closed, names, params, shapes_old, shapes_new)
    except _streams.GrowthError as e:
        raise ValueError(f"growth cannot keep the function: {e}") from None
    for root, (p, q) in an.growth.items():
        members = [n for n, st in zip(names, an.stream) if root in st.values()]
        if pairing and (q - p) % 2:
            raise ValueError(
                f"{members[:3]!r} grow by {q - p} units, an odd number; pairing=True needs even "
                "increments (pairing=False gives new units zero fan-out instead)"
            )
    mult = _variance_transfer(an, names, params, shapes_old, shapes_new) if rescale else {}
    out = []
    for i, name in enumerate(names):
        grown = an.stream[i]
        if not grown:
            out.append(old[i])
            continue
        tied = set(grown) & an.contracted[i] & an.produced[i]
        if tied:
            raise ValueError(
                f"{name!r} is read both as a kernel's input slots and as units along its grown "
                f"axis {sorted(tied)[0]} (tied weights): pairing cannot serve both"
            )
        unread = set(grown) - an.contracted[i] - an.produced[i]
        if unread:
            raise ValueError(
                f"{name!r} grows along axis {sorted(unread)[0]}, which the forward pass never "
                "reads; pass inputs and kwargs that use every layer"
            )
        o = np.asarray(old[i])
        if isinstance(new[i], jax.ShapeDtypeStruct):
            fan_in = (
                math.prod(shapes_new[i][a] for a in an.contracted[i]) if an.contracted[i] else 0
            )
            v = _draw(key, i, shapes_new[i], fan_in, name)
        else:
            v = np.array(new[i], np.float32 if o.dtype.kind == "f" else o.dtype)
        for ax in sorted(grown):
            p, q = shapes_old[i][ax], shapes_new[i][ax]
            if pairing:
                h = (q - p) // 2
                src = [slice(None)] * v.ndim
                dst = list(src)
                src[ax], dst[ax] = slice(p, p + h), slice(p + h, q)
                sign = -1.0 if ax in an.contracted[i] else 1.0
                v[tuple(dst)] = sign * v[tuple(src)]
            elif ax in an.contracted[i]:
                idx = [slice(None)] * v.ndim
                idx[ax] = slice(p, q)
                v[tuple(idx)] = 0.0  # zero fan-out of the new units
        block = tuple(slice(0, n) for n in o.shape)
        if name in mult and mult[name] == "var":
            s2 = mult[_mean_of(name)] ** 2
            v[block] = np.maximum(s2 * (o + eps) - eps, 0.0)
        else:
            v[block] = o * mult.get(name, 1.0)
        out.append(v.astype(o.dtype))
    return out


def _mean_of(var: str) -> str:
    return var.rpartition("/")[0] + "/mean"


def _variance_transfer(an, names, params, old, new) -> dict[str, Any]:
    """``{name: scale}`` of variance transfer: kernels a batch norm reads, their biases, the
    norms' running means; a norm's variance is marked ``"var"`` (``s**2 (var + eps) - eps``)."""
    by_name = {n: i for i, n in enumerate(names)}
    out: dict[str, Any] = {}
    for k, mean in an.norm.items():
        uses = len(an.uses.get(k, ())) - (k in an.bias)
        var = mean_var = names[mean].rpartition("/")[0] + "/var"
        if uses != 1 or var not in by_name or names[mean] != _mean_of(var):
            continue
        grown_in = [a for a in an.contracted[k] if a in an.stream[k]]
        if not grown_in:
            continue
        s = math.sqrt(math.prod(old[k][a] / new[k][a] for a in grown_in))
        out[names[k]] = s
        if k in an.bias:
            out[names[an.bias[k]]] = s
        out[names[mean]] = s
        out[mean_var] = "var"
    return out
