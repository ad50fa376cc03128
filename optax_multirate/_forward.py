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


@dataclasses.dataclass(frozen=True)
class Stack:
    """How a ``scan`` slices a leaf: the scan (its position), its length, the leaf's axis."""

    scan: int
    length: int
    axis: int
    reverse: bool


#: Primitives whose output is the same param, viewed: its first read is where the view is used.
_VIEWS = ("transpose", "convert_element_type", "copy", "copy_p")


@dataclasses.dataclass
class Reads:
    """What :func:`first_reads` finds, per leaf and per scan that slices a leaf.

    Attributes:
      first: position of the first equation reading each leaf, or None (never read).
      stacks: per leaf, the :class:`Stack` that slices it (None: not sliced by a scan).
      nested: per leaf, True when a scan slices a slice of it again (a stack of stacks).
      scans: ``{scan position: (first, last + 1)}``, the positions of each slicing scan's body.
    """

    first: list[int | None]
    stacks: list[Stack | None]
    nested: list[bool]
    scans: dict[int, tuple[int, int]]


def first_reads(fn: Callable[..., Any], leaves: Sequence[Any]) -> Reads:
    """Position of the first equation reading each leaf in the jaxpr of ``fn(*leaves)``.

    Calls (``jit``, ``remat``, custom derivatives, ``scan`` bodies) are entered, so a position
    is that of the innermost equation; a leaf read by a ``cond`` or ``while`` gets the
    position of that equation. Views of a leaf (transposes, dtype casts) are followed, so a
    leaf transposed before a scan (``nn.scan`` over a non-leading axis) counts as sliced on
    its own axis. A leaf sliced by a ``scan`` gets a :class:`Stack`.
    """
    closed = jax.make_jaxpr(fn)(*leaves)
    n = len(leaves)
    out = Reads([None] * n, [None] * n, [False] * n, {})
    counter = itertools.count()
    jaxpr_types = (jex.core.Jaxpr, jex.core.ClosedJaxpr)

    def walk(jaxpr: Any, env: dict) -> None:
        # env: var -> (leaf, leaf axis of each of the var's axes, scans around the slice)
        for eqn in jaxpr.eqns:
            pos = next(counter)
            ins = [env.get(v) if isinstance(v, jex.core.Var) else None for v in eqn.invars]
            if all(i is None for i in ins):
                continue
            if eqn.primitive.name in _VIEWS and len(ins) == 1:
                i, axes, level = ins[0]
                perm = eqn.params.get("permutation", range(len(axes)))
                env[eqn.outvars[0]] = (i, tuple(axes[p] for p in perm), level)
                continue
            subs = [s for s in eqn.params.values() if isinstance(s, jaxpr_types)]
            sub = subs[0] if len(subs) == 1 else None
            sub = sub.jaxpr if isinstance(sub, jex.core.ClosedJaxpr) else sub
            if sub is not None and len(sub.invars) == len(eqn.invars):
                scan = eqn.primitive.name == "scan"
                sub_ins = list(ins)
                if scan:
                    start = eqn.params["num_consts"] + eqn.params["num_carry"]
                    for j in range(start, len(ins)):
                        if ins[j] is None:
                            continue
                        i, axes, level = ins[j]
                        if level or axes[0] is None:
                            out.nested[i] = True
                        elif out.stacks[i] is None:
                            out.stacks[i] = Stack(
                                pos, int(eqn.params["length"]), axes[0], bool(eqn.params["reverse"])
                            )
                        sub_ins[j] = (i, axes[1:], level + 1)
                sub_env = {v: x for v, x in zip(sub.invars, sub_ins) if x is not None}
                walk(sub, sub_env)
                if scan:
                    out.scans[pos] = (pos + 1, next(counter))
                elif len(sub.outvars) == len(eqn.outvars):  # passed-through leaves
                    for o, so in zip(eqn.outvars, sub.outvars):
                        if isinstance(so, jex.core.Var) and so in sub_env:
                            env[o] = sub_env[so]
                continue
            for x in ins:
                if x is not None and out.first[x[0]] is None:
                    out.first[x[0]] = pos

    env = {
        v: (i, tuple(range(np.ndim(x))), 0)
        for i, (v, x) in enumerate(zip(closed.jaxpr.invars, leaves))
    }
    walk(closed.jaxpr, env)
    return out


def _array_leaves(out: Any) -> list:
    return [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]


@dataclasses.dataclass
class Trace:
    """Per param leaf: its names, owning module path, first read and the scan stacking it."""

    names: list[tuple[Hashable, ...]]
    owners: list[tuple[Hashable, ...]]
    first: list[int | None]
    stacks: list[Stack | None]
    nested: list[bool]
    scans: dict[int, tuple[int, int]]
    module_types: dict[tuple[Hashable, ...], type]
    is_module: Callable[[tuple[Hashable, ...]], bool]


def trace_linen(model: nn.Module, variables: Mapping[str, Any], args: tuple, kwargs: dict) -> Trace:
    """Traces ``model.apply(variables, *args, **kwargs)`` for the leaves of ``params``."""
    types: dict[tuple[str, ...], type] = {}

    def interceptor(next_fun, iargs, ikwargs, context):
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path not in types:
            types[path] = type(context.module)
        return next_fun(*iargs, **ikwargs)

    flat, treedef = jax.tree_util.tree_flatten_with_path(dict(variables))
    names = [key_parts(p) for p, _ in flat]

    def run(*leaves):
        with nn.intercept_methods(interceptor):
            return _array_leaves(
                model.apply(treedef.unflatten(leaves), *args, mutable=True, **kwargs)
            )

    reads = first_reads(run, [x for _, x in flat])
    keep = [i for i, n in enumerate(names) if n[0] == "params"]
    param_names = [names[i][1:] for i in keep]
    for n in param_names:
        if n[:-1] not in types:
            raise ValueError(
                f"depth_labels: the param at {joined(n)!r} belongs to no module called in the "
                "forward pass; pass inputs and kwargs that use every layer"
            )
    return Trace(
        names=param_names,
        owners=[n[:-1] for n in param_names],
        first=[reads.first[i] for i in keep],
        stacks=[reads.stacks[i] for i in keep],
        nested=[reads.nested[i] for i in keep],
        scans=reads.scans,
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

    reads = first_reads(run, [x for _, x in flat] + rest_leaves)
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
    return Trace(
        names, owners, reads.first[:n], reads.stacks[:n], reads.nested[:n], reads.scans,
        modules, modules.__contains__,
    )  # fmt: skip


#: A depth label: an int, or ``(one depth per slice, stacked axis)`` for a scanned stack's leaf.
Depth = int | tuple[tuple[int, ...], int]


def _stacked_twice(names: tuple[Hashable, ...]) -> ValueError:
    return ValueError(
        f"depth_labels: the param at {joined(names)!r} is stacked twice (a scan over the slices "
        "of a scanned stack): per-slice depth covers one level of stacking; label this model "
        "with rule_labels or pass a label tree by hand"
    )


def assign_depths(trace: Trace, unit_level: int | None, merge_norm: bool) -> dict[str, Depth]:
    """Depth of each param leaf, ``{path: depth}``, from a :class:`Trace`.

    A leaf's unit is the module at ``unit_level`` (counting modules from the root) that owns
    it, or its owning module when ``unit_level`` is None. Units are numbered in the order
    their params are first read. A module's own params whose owner also contains units (a
    root's ``pos_embed``, or a block's own scale when ``unit_level`` is None) are placed by
    their first read: those read between the same two units form one unit there. With
    ``merge_norm`` a normalization layer that is its own unit joins the unit before it.

    Scanned stacks: a unit all of whose params one ``scan`` slices (``nn.scan``, ``nnx.scan``,
    ``lax.scan`` over stacked layers) is one unit per slice. The units first read in the
    scan's body repeat in the order the scan runs its slices (``a0 b0 a1 b1 ...``; a reversed
    scan runs the last slice first); a unit read there that the scan does not slice (a shared
    layer, or a unit that holds more than the stack) keeps one depth, in the first slice. A
    stacked leaf's depth is ``(depths, axis)``: one depth per slice along its stacked axis
    (an int when all slices share one depth, as the slices of an ``nn.vmap`` do).
    """
    for nm, nested in zip(trace.names, trace.nested):
        if nested:
            raise _stacked_twice(nm)
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
    key_pos: dict[tuple, int] = {}
    members: dict[tuple, list[int]] = {}
    units_seen = 0
    for f, i in sorted((f, i) for i, f in enumerate(trace.first) if f is not None):
        key = ("own", unit[i], units_seen) if container[i] else ("unit", unit[i])
        if key not in key_pos:
            seq.append(key)
            key_pos[key] = f
            units_seen += not container[i]
        keys[i] = key
        members.setdefault(key, []).append(i)
    for i, f in enumerate(trace.first):
        if f is None:
            keys[i] = ("unit", unit[i])
            if container[i] or keys[i] not in key_pos:
                raise ValueError(
                    f"depth_labels: the param at {joined(trace.names[i])!r} is never read in "
                    "the forward pass; pass inputs and kwargs that use every layer"
                )
    stack_of = _stack_keys(trace, members)
    expanded = _expand(seq, key_pos, stack_of, trace)
    target: dict[tuple, int] = {}
    count = 0
    for j, vu in enumerate(expanded):
        key = vu[0]
        kind = trace.module_types.get(key[1]) if key[0] == "unit" else None
        if merge_norm and j > 0 and kind is not None and issubclass(kind, NORM_TYPES):
            target[vu] = target[expanded[j - 1]]
        else:
            target[vu] = count
            count += 1
    out: dict[str, Depth] = {}
    for i, (nm, key) in enumerate(zip(trace.names, keys)):
        st = trace.stacks[i]
        if key not in stack_of:
            out[joined(nm)] = target[(key, None)]
        elif st is None or st.scan != stack_of[key].scan:
            out[joined(nm)] = target[(key, 0)]
        else:
            depths = tuple(target[(key, s)] for s in range(st.length))
            out[joined(nm)] = depths[0] if len(set(depths)) == 1 else (depths, st.axis)
    return out


def _stack_keys(trace: Trace, members: dict[tuple, list[int]]) -> dict[tuple, Stack]:
    """The units one scan slices whole, each with the :class:`Stack` of that scan."""
    out = {}
    for key, idx in members.items():
        stacks = {trace.stacks[i] and dataclasses.replace(trace.stacks[i], axis=0) for i in idx}
        if len(stacks) != 1 or None in stacks:
            continue
        st = stacks.pop()
        lo, hi = trace.scans[st.scan]
        if all(lo <= trace.first[i] < hi for i in idx):
            out[key] = st
    return out


def _expand(
    seq: list[tuple], key_pos: dict[tuple, int], stack_of: dict[tuple, Stack], trace: Trace
) -> list[tuple[tuple, int | None]]:
    """Units in forward order, a scanned unit once per slice: ``(key, slice or None)``."""
    stacking = {st.scan: st for st in stack_of.values()}
    out: list[tuple[tuple, int | None]] = []
    j = 0
    while j < len(seq):
        st = next(
            (s for s in stacking.values()
             if trace.scans[s.scan][0] <= key_pos[seq[j]] < trace.scans[s.scan][1]),
            None,
        )  # fmt: skip
        if st is None:
            out.append((seq[j], None))
            j += 1
            continue
        lo, hi = trace.scans[st.scan]
        run = []
        while j < len(seq) and lo <= key_pos[seq[j]] < hi:
            run.append(seq[j])
            j += 1
        for t in range(st.length):
            sl = st.length - 1 - t if st.reverse else t
            for key in run:
                if key in stack_of and stack_of[key].scan == st.scan:
                    out.append((key, sl))
                elif t == 0:
                    out.append((key, None))
    return out
