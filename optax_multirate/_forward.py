"""Reading Flax models: param paths and the forward order of their params (private).

Linen params are nested dicts; Flax NNX state (``nnx.State``) holds the same nesting with each
leaf wrapped in an ``nnx.Variable``, whose value flattens under an attribute key ``value``.
:func:`key_parts` reads a JAX key path without that trailing part, so ``conv1/kernel`` names
the same param in ``nnx.state(model, nnx.Param)`` (what ``nnx.Optimizer`` gives ``tx.init``)
and in its pure form (what it gives ``tx.update``).

:func:`trace_linen` and :func:`trace_nnx` record, for each param leaf, the position of the
first equation that reads it in the jaxpr of one forward pass (``jax.make_jaxpr``; nothing
runs). Positions follow trace order, which is the order of the Python forward pass, through
``jit``, ``remat`` and custom-derivative calls; a param sliced by a ``scan`` (a stack of
layers on a leading axis) is marked as stacked. :func:`assign_depths` turns these into depth
units; it is the core of :func:`optax_multirate.labels.depth_labels`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.extend as jex
import numpy as np
from flax import nnx

NORM_TYPES = (
    nn.BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nnx.BatchNorm,
    nnx.LayerNorm,
    nnx.GroupNorm,
    nnx.RMSNorm,
)

#: NNX variable types that hold no trainable parameter: a label helper given one refuses it.
NOT_TRAINABLE = (nnx.BatchStat, nnx.RngState, nnx.Cache, nnx.Intermediate, nnx.Perturbation)


def is_variable(x: Any) -> bool:
    """True for an NNX ``Variable`` (a leaf of a Variable-wrapped ``nnx.State``)."""
    return isinstance(x, nnx.Variable)


def key_parts(path: Sequence[Any]) -> tuple[Hashable, ...]:
    """The names of a JAX key path (or a tuple of names), without an NNX Variable's ``value``.

    A trailing attribute key ``value`` (how an ``nnx.Variable`` flattens) is dropped; dict keys
    keep their type (an ``nnx.List`` index is an int).
    """
    parts = list(path)
    if parts and isinstance(parts[-1], jax.tree_util.GetAttrKey) and parts[-1].name == "value":
        parts.pop()
    out: list[Hashable] = []
    for k in parts:
        if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.FlattenedIndexKey)):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        else:
            out.append(k)
    return tuple(out)


def joined(parts: Sequence[Hashable]) -> str:
    return "/".join(map(str, parts))


def first_reads(fn: Callable[..., Any], leaves: Sequence[Any]) -> tuple[list, list[bool]]:
    """Position of the first equation reading each leaf in the jaxpr of ``fn(*leaves)``.

    Calls (``jit``, ``remat``, custom derivatives, ``scan`` bodies) are entered, so a position
    is that of the innermost equation; a leaf read by a ``cond`` or ``while`` gets the
    position of that equation. A leaf sliced by a ``scan`` is marked stacked.

    Returns:
      ``(first, stacked)``: per leaf, an int position or None (never read), and a bool.
    """
    closed = jax.make_jaxpr(fn)(*leaves)
    first: list[int | None] = [None] * len(leaves)
    stacked = [False] * len(leaves)
    counter = itertools.count()
    jaxpr_types = (jex.core.Jaxpr, jex.core.ClosedJaxpr)

    def walk(jaxpr: Any, env: dict) -> None:
        for eqn in jaxpr.eqns:
            pos = next(counter)
            ins = [env.get(v) if isinstance(v, jex.core.Var) else None for v in eqn.invars]
            if all(i is None for i in ins):
                continue
            subs = [s for s in eqn.params.values() if isinstance(s, jaxpr_types)]
            sub = subs[0] if len(subs) == 1 else None
            sub = sub.jaxpr if isinstance(sub, jex.core.ClosedJaxpr) else sub
            if sub is not None and len(sub.invars) == len(eqn.invars):
                scan = eqn.primitive.name == "scan"
                if scan:
                    for i in ins[eqn.params["num_consts"] + eqn.params["num_carry"] :]:
                        if i is not None:
                            stacked[i] = True
                sub_env = {v: i for v, i in zip(sub.invars, ins) if i is not None}
                walk(sub, sub_env)
                if not scan and len(sub.outvars) == len(eqn.outvars):  # passed-through leaves
                    for o, so in zip(eqn.outvars, sub.outvars):
                        if isinstance(so, jex.core.Var) and so in sub_env:
                            env[o] = sub_env[so]
                continue
            for i in ins:
                if i is not None and first[i] is None:
                    first[i] = pos

    walk(closed.jaxpr, dict(zip(closed.jaxpr.invars, range(len(leaves)))))
    return first, stacked


def _array_leaves(out: Any) -> list:
    return [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]


@dataclasses.dataclass
class Trace:
    """Per param leaf: its names, owning module path, first read and whether it is stacked."""

    names: list[tuple[Hashable, ...]]
    owners: list[tuple[Hashable, ...]]
    first: list[int | None]
    stacked: list[bool]
    module_types: dict[tuple[Hashable, ...], type]
    is_module: Callable[[tuple[Hashable, ...]], bool]


def _stack_error(names: tuple[Hashable, ...], how: str = "") -> ValueError:
    return ValueError(
        f"depth_labels: the param at {joined(names)!r} is stacked on a leading layer axis{how} "
        "(nn.scan, nn.vmap, nnx.scan or nnx.vmap): each slice is a layer with its own depth, "
        "which depth_labels does not support; label this model with rule_labels or pass a "
        "label tree by hand"
    )


def trace_linen(model: nn.Module, variables: Mapping[str, Any], args: tuple, kwargs: dict) -> Trace:
    """Traces ``model.apply(variables, *args, **kwargs)`` for the leaves of ``params``."""
    types: dict[tuple[str, ...], type] = {}
    inner_shapes: dict[tuple[str, ...], tuple] = {}

    def interceptor(next_fun, iargs, ikwargs, context):
        mod = context.module
        path = tuple(mod.path)
        if context.method_name == "__call__" and path not in types:
            types[path] = type(mod)
        out = next_fun(*iargs, **ikwargs)
        if mod.scope is not None:
            own = mod.variables.get("params", {})
            for k, v in own.items():
                if not isinstance(v, Mapping):
                    inner_shapes.setdefault((*path, k), tuple(np.shape(v)))
        return out

    flat, treedef = jax.tree_util.tree_flatten_with_path(dict(variables))
    names = [key_parts(p) for p, _ in flat]

    def run(*leaves):
        with nn.intercept_methods(interceptor):
            return _array_leaves(
                model.apply(treedef.unflatten(leaves), *args, mutable=True, **kwargs)
            )

    first_all, stacked_all = first_reads(run, [x for _, x in flat])
    keep = [i for i, n in enumerate(names) if n[0] == "params"]
    param_names = [names[i][1:] for i in keep]
    for n, i in zip(param_names, keep):
        seen = inner_shapes.get(n)
        if seen is not None and len(seen) < np.ndim(flat[i][1]):
            raise _stack_error(
                n, f": it has shape {np.shape(flat[i][1])} but its module sees {seen}"
            )
        if n[:-1] not in types:
            raise ValueError(
                f"depth_labels: the param at {joined(n)!r} belongs to no module called in the "
                "forward pass; pass inputs and kwargs that use every layer"
            )
    return Trace(
        names=param_names,
        owners=[n[:-1] for n in param_names],
        first=[first_all[i] for i in keep],
        stacked=[stacked_all[i] for i in keep],
        module_types=types,
        is_module=lambda _: True,  # every Linen path prefix is a module scope
    )


def trace_nnx(model: nnx.Module, args: tuple, kwargs: dict) -> Trace:
    """Traces ``model(*args, **kwargs)`` (on a copy) for the leaves of ``nnx.Param`` state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    rest_leaves, rest_def = jax.tree.flatten(rest)
    n = len(flat)

    def run(*leaves):
        copy = nnx.merge(graphdef, treedef.unflatten(leaves[:n]), rest_def.unflatten(leaves[n:]))
        return _array_leaves(copy(*args, **kwargs))

    first, stacked = first_reads(run, [x for _, x in flat] + rest_leaves)
    # nnx.List and nnx.Dict hold modules as a Python list or dict would: no module level
    modules = {
        tuple(p): type(m)
        for p, m in nnx.iter_modules(model)
        if not isinstance(m, (nnx.List, nnx.Dict))
    }
    names = [key_parts(p) for p, _ in flat]
    owners = []
    for nm in names:
        owner = nm[:-1]
        while owner and owner not in modules:
            owner = owner[:-1]
        owners.append(owner)
    return Trace(names, owners, first[:n], stacked[:n], modules, modules.__contains__)


def assign_depths(trace: Trace, unit_level: int | None, merge_norm: bool) -> dict[str, int]:
    """Depth unit of each param leaf, ``{path: depth}``, from a :class:`Trace`.

    A leaf's unit is the module at ``unit_level`` (counting modules from the root) that owns
    it, or its owning module when ``unit_level`` is None. Units are numbered in the order
    their params are first read. A module's own params whose owner also contains units (a
    root's ``pos_embed``, or a block's own scale when ``unit_level`` is None) are placed by
    their first read: those read between the same two units form one unit there. With
    ``merge_norm`` a normalization layer that is its own unit joins the unit before it.
    """
    for nm, st in zip(trace.names, trace.stacked):
        if st:
            raise _stack_error(nm)
    owners = trace.owners
    owner_set = set(owners)
    unit: list[tuple] = []
    container: list[bool] = []
    for o in owners:
        chain = [o[:i] for i in range(1, len(o) + 1) if trace.is_module(o[:i])]
        if unit_level is None:
            unit.append(o)
            container.append(any(len(q) > len(o) and q[: len(o)] == o for q in owner_set))
        else:
            unit.append(chain[unit_level - 1] if len(chain) >= unit_level else o)
            container.append(len(chain) < unit_level)
    keys: list[tuple | None] = [None] * len(owners)
    seq: list[tuple] = []
    units_seen = 0
    for _, i in sorted((f, i) for i, f in enumerate(trace.first) if f is not None):
        key = ("own", unit[i], units_seen) if container[i] else ("unit", unit[i])
        if key not in seq:
            seq.append(key)
            units_seen += not container[i]
        keys[i] = key
    for i, f in enumerate(trace.first):
        if f is None:
            keys[i] = ("unit", unit[i])
            if container[i] or keys[i] not in seq:
                raise ValueError(
                    f"depth_labels: the param at {joined(trace.names[i])!r} is never read in "
                    "the forward pass; pass inputs and kwargs that use every layer"
                )
    target: dict[tuple, int] = {}
    count = 0
    for j, key in enumerate(seq):
        kind = trace.module_types.get(key[1]) if key[0] == "unit" else None
        if merge_norm and j > 0 and kind is not None and issubclass(kind, NORM_TYPES):
            target[key] = target[seq[j - 1]]
        else:
            target[key] = count
            count += 1
    return {joined(nm): target[k] for nm, k in zip(trace.names, keys)}
