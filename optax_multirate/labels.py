"""Label trees from Flax parameters.

A label tree has the structure of the params and a hashable label at each leaf: exactly what
``optax.partition`` (alias ``multi_transform``) takes. Labels are static Python, computed once
and never traced.

* :func:`depth_labels` gives each leaf its depth unit in **forward order**, taken from the
  order in which modules are first called in one abstract forward pass (never from names:
  Flax flattens dicts in sorted key order, so ``Dense_10`` would come before ``Dense_2``).
* :func:`weight_bias_labels` labels leaves ``"weight"`` or ``"bias"``.
* :func:`rule_labels` labels leaves by rules on their paths (e.g. fast head, slow backbone).
* :func:`random_labels` draws a seeded random subset of leaves.
* :func:`check_labels` validates a label tree against params (used by every method at
  ``init``).

Paths are written ``"Conv_0/kernel"``: the dict keys from the root of the tree given, joined
with ``/``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

__all__ = [
    "path_str",
    "leaf_paths",
    "check_labels",
    "depth_labels",
    "weight_bias_labels",
    "rule_labels",
    "random_labels",
    "resolve_labels",
]

_NORM_TYPES = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def path_str(path: Sequence[Any]) -> str:
    """Joins a JAX key path (or a tuple of names) into ``"a/b/c"``.

    Examples:
      >>> path_str(("Conv_0", "kernel"))
      'Conv_0/kernel'
    """
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def leaf_paths(tree: Any) -> list[str]:
    """Paths of the leaves of ``tree`` in flatten order (``MaskedNode`` holes skipped)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in flat]


def check_labels(
    labels: Any,
    params: Any,
    *,
    allowed: Iterable[Hashable] | None = None,
    name: str = "labels",
    require: Iterable[Hashable] = (),
) -> dict[str, Hashable]:
    """Checks that a label tree matches ``params`` and returns ``{path: label}``.

    ``params`` may contain ``optax.MaskedNode`` holes (as inside ``optax.partition``); the label
    tree may then be either the full tree or the holed one: only the leaves of ``params`` are
    looked up, by path.

    Args:
      labels: label tree, or a callable ``params -> label tree``.
      params: the parameter tree.
      allowed: if given, the labels that may appear.
      name: the argument's name, used in error messages.
      require: labels that must label at least one leaf of ``params``.

    Returns:
      A dict from the path of each leaf of ``params`` to its label.

    Raises:
      ValueError: naming the path, if a leaf of ``params`` has no label, a label is not
        allowed or not hashable, or a required label labels nothing.
    """
    if callable(labels):
        labels = labels(params)
    by_path: dict[str, Hashable] = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(labels, is_leaf=_is_masked)
    for p, lab in flat:
        if _is_masked(lab):
            continue
        by_path[path_str(p)] = lab
    allowed_set = set(allowed) if allowed is not None else None
    out: dict[str, Hashable] = {}
    for path in leaf_paths(params):
        if path not in by_path:
            raise ValueError(
                f"{name} does not match the params: no label for the param at {path!r} "
                f"(labelled paths include {sorted(by_path)[:5]!r})"
            )
        lab = by_path[path]
        try:
            hash(lab)
        except TypeError as e:
            raise ValueError(f"{name}: label at {path!r} is not hashable: {lab!r}") from e
        if allowed_set is not None and lab not in allowed_set:
            raise ValueError(
                f"{name}: label {lab!r} at {path!r} is not one of {sorted(map(str, allowed_set))}"
            )
        out[path] = lab
    extra = set(by_path) - set(out)
    full_paths = set(leaf_paths(params))
    if extra and not any(_is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked)):
        stray = sorted(extra - full_paths)
        if stray:
            raise ValueError(
                f"{name} does not match the params: labels at {stray[:5]!r} have no param"
            )
    for r in require:
        if r not in out.values():
            raise ValueError(
                f"{name}: no param is labelled {r!r}; labels found: "
                f"{sorted(set(map(str, out.values())))}"
            )
    return out


def resolve_labels(labels: Any, params: Any, **kwargs: Any) -> Any:
    """Returns the label tree (calling ``labels(params)`` if callable), checked against params.

    The result has the structure of ``params`` (``MaskedNode`` holes kept).
    """
    by_path = check_labels(labels, params, **kwargs)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree_util.tree_unflatten(treedef, [by_path[path_str(p)] for p, _ in flat])


def _label_tree(params: Any, fn: Callable[[str, Any], Hashable]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), params)


# --------------------------------------------------------------------------- depth


def _record_call_order(
    model: nn.Module, variables: Mapping[str, Any], args: tuple, kwargs: dict
) -> tuple[list[tuple[str, ...]], dict[tuple[str, ...], type], dict[str, tuple]]:
    """Module paths in first-call order, their types, and param shapes seen inside modules."""
    order: list[tuple[str, ...]] = []
    types: dict[tuple[str, ...], type] = {}
    inner_shapes: dict[str, tuple] = {}

    def interceptor(next_fun, iargs, ikwargs, context):
        mod = context.module
        path = tuple(mod.path)
        if context.method_name == "__call__" and path not in types:
            order.append(path)
            types[path] = type(mod)
        out = next_fun(*iargs, **ikwargs)
        if mod.has_variable("params", "kernel") or mod.scope is not None:
            try:
                own = mod.variables.get("params", {})
            except Exception:  # pragma: no cover - unbound modules
                own = {}
            for k, v in own.items():
                if not isinstance(v, Mapping):
                    inner_shapes.setdefault("/".join((*path, k)), tuple(np.shape(v)))
        return out

    def run(v):
        with nn.intercept_methods(interceptor):
            return model.apply(v, *args, mutable=True, **kwargs)

    jax.eval_shape(run, dict(variables))
    return order, types, inner_shapes


def depth_labels(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    unit_level: int | None = 1,
    merge_norm: bool = True,
    rngs: Mapping[str, jax.Array] | None = None,
    **kwargs: Any,
) -> Any:
    """Depth label tree for ``variables["params"]``, in forward order.

    Depth comes from the order in which modules are first called in one abstract forward pass
    (``jax.eval_shape`` of ``model.apply(variables, *args, **kwargs)`` with
    ``flax.linen.intercept_methods``), so any Flax model works whatever its names.

    Depth units (documented places):

    * a unit is the module at ``unit_level`` below the root that contains the leaf (``1``: the
      root's direct children, so a residual block with its convs, batch norms and projection
      shortcut is one unit); ``unit_level=None`` makes every module that owns params its own
      unit;
    * with ``merge_norm`` a normalization layer (batch norm, layer norm: scale and bias) that is
      its own unit joins the unit called just before it (the layer it normalizes), so
      ``stem`` + ``stem_bn`` is depth 0;
    * embeddings come first if called first; the head is the last unit called;
    * a module called twice (shared or tied params) keeps the depth of its first call.

    Args:
      model: a Flax linen module.
      variables: its variables (``{"params": ..., "batch_stats": ...}``) or params alone.
      *args: example inputs for the forward pass (only shapes matter).
      unit_level: module-path depth that defines a unit, or None for one unit per module.
      merge_norm: merge normalization layers into the preceding unit.
      rngs: rngs for the forward pass (e.g. ``{"dropout": key}``), if it needs any.
      **kwargs: keyword arguments of the forward pass (e.g. ``train=False``).

    Returns:
      A tree with the structure of ``variables["params"]`` holding ints ``0..n-1``.

    Raises:
      ValueError: if a param is never used in the forward pass, or layers are stacked on a
        leading axis by ``nn.scan``/``nn.vmap`` (per-slice depth is not supported).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_multirate.models import MLP
      >>> m = MLP(features=(8,) * 11, num_classes=3)
      >>> v = m.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> d = depth_labels(m, v, jnp.zeros((1, 4)))
      >>> d["Dense_2"]["kernel"], d["Dense_10"]["kernel"], d["head"]["bias"]
      (2, 10, 11)
    """
    if unit_level is not None and (
        isinstance(unit_level, bool) or not isinstance(unit_level, int) or unit_level < 1
    ):
        raise ValueError(f"unit_level must be an int >= 1 or None, got {unit_level!r}")
    if "params" not in variables:
        variables = {"params": variables}
    if rngs is not None:
        kwargs = dict(kwargs, rngs=rngs)
    order, types, inner_shapes = _record_call_order(model, variables, args, kwargs)
    params = variables["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaf_mod = []  # owning module path of each leaf
    for p, leaf in flat:
        names = tuple(path_str([k]) for k in p)
        mod_path = names[:-1]
        seen = inner_shapes.get("/".join(names))
        if seen is not None and len(seen) < np.ndim(leaf):
            raise ValueError(
                f"depth_labels: the param at {'/'.join(names)!r} has shape {np.shape(leaf)} "
                f"but its module sees {seen}: layers stacked on a leading axis by nn.scan or "
                "nn.vmap get one depth per slice, which depth_labels does not support; label "
                "this model with rule_labels or pass a label tree by hand"
            )
        if mod_path not in types:
            raise ValueError(
                f"depth_labels: the param at {'/'.join(names)!r} belongs to no module called "
                "in the forward pass; pass inputs and kwargs that use every layer"
            )
        leaf_mod.append(mod_path)

    owners = {m for m in leaf_mod}
    # unit key of each param-owning module, in first-call order
    unit_of: dict[tuple[str, ...], tuple[str, ...]] = {}
    unit_order: list[tuple[str, ...]] = []
    prev_unit: tuple[str, ...] | None = None
    for mod in order:
        if mod not in owners:
            continue
        unit = mod if unit_level is None else mod[:unit_level]
        is_norm = issubclass(types[mod], _NORM_TYPES)
        own_unit = unit_level is None or len(mod) <= unit_level
        if merge_norm and is_norm and own_unit and prev_unit is not None:
            unit = prev_unit
        unit_of[mod] = unit
        if unit not in unit_order:
            unit_order.append(unit)
        prev_unit = unit
    index = {u: i for i, u in enumerate(unit_order)}
    return jax.tree_util.tree_unflatten(treedef, [index[unit_of[m]] for m in leaf_mod])


# --------------------------------------------------------------------------- weight / bias


def weight_bias_labels(params: Any, *, norm_scale: str = "weight") -> Any:
    """Labels each leaf ``"weight"`` or ``"bias"``.

    Leaves named ``bias`` are biases (dense, conv and normalization offsets); normalization
    ``scale`` leaves are ``norm_scale``; all others (kernels, embeddings) are weights.

    Args:
      params: the parameter tree.
      norm_scale: ``"weight"`` (default) or ``"bias"``: where normalization scales go.

    Raises:
      ValueError: if ``norm_scale`` is not ``"weight"`` or ``"bias"``.

    Examples:
      >>> weight_bias_labels({"Dense_0": {"kernel": 0, "bias": 0}, "BatchNorm_0": {"scale": 0}})
      {'BatchNorm_0': {'scale': 'weight'}, 'Dense_0': {'bias': 'bias', 'kernel': 'weight'}}
    """
    if norm_scale not in ("weight", "bias"):
        raise ValueError(f"norm_scale must be 'weight' or 'bias', got {norm_scale!r}")

    def fn(path: str, _: Any) -> str:
        name = path.rsplit("/", 1)[-1]
        if name == "bias":
            return "bias"
        if name == "scale":
            return norm_scale
        return "weight"

    return _label_tree(params, fn)


# --------------------------------------------------------------------------- rules

Rule = str | Callable[[str, Any], bool]


def rule_labels(
    params: Any,
    rules: Mapping[Hashable, Rule | Sequence[Rule]],
    *,
    default: Hashable | None = None,
) -> Any:
    """Labels leaves by rules on their paths.

    Each label maps to one rule or a list of rules. A string rule is a regular expression
    searched in the leaf's path (``"head"`` matches ``"head/kernel"``; anchor with ``^``/``$``);
    a callable rule is ``fn(path, leaf) -> bool``. Leaves no rule matches get ``default``.

    Args:
      params: the parameter tree.
      rules: ``{label: rule or rules}``, e.g. ``{"fast": ["^head/"]}``.
      default: label of unmatched leaves; None makes an unmatched leaf an error.

    Returns:
      A label tree with the structure of ``params``.

    Raises:
      ValueError: naming the rule, if a rule matches no leaf, a leaf is matched by rules of two
        labels, or a leaf is unmatched and there is no ``default``.

    Examples:
      >>> p = {"Conv_0": {"kernel": 0}, "head": {"kernel": 0, "bias": 0}}
      >>> rule_labels(p, {"fast": "^head/"}, default="slow")
      {'Conv_0': {'kernel': 'slow'}, 'head': {'bias': 'fast', 'kernel': 'fast'}}
    """
    if not isinstance(rules, Mapping) or not rules:
        raise ValueError(f"rules must be a non-empty mapping of label -> rule(s), got {rules!r}")
    compiled: list[tuple[Hashable, Rule, Callable[[str, Any], bool]]] = []
    for label, rs in rules.items():
        if isinstance(rs, str) or callable(rs):
            rs = [rs]
        elif not isinstance(rs, Sequence):
            raise ValueError(
                f"rules[{label!r}]: a rule must be a str or callable, or a list of them, got {rs!r}"
            )
        for r in rs:
            if isinstance(r, str):
                try:
                    pat = re.compile(r)
                except re.error as e:
                    raise ValueError(f"rules[{label!r}]: bad regular expression {r!r}: {e}") from e
                compiled.append((label, r, lambda path, _x, pat=pat: pat.search(path) is not None))
            elif callable(r):
                compiled.append((label, r, r))
            else:
                raise ValueError(f"rules[{label!r}]: a rule must be a str or callable, got {r!r}")
    hits = {id(r): 0 for _, r, _ in compiled}

    def fn(path: str, leaf: Any) -> Hashable:
        found = []
        for label, r, test in compiled:
            if test(path, leaf):
                hits[id(r)] += 1
                if label not in found:
                    found.append(label)
        if len(found) > 1:
            raise ValueError(f"rule_labels: the param at {path!r} matches rules of labels {found}")
        if found:
            return found[0]
        if default is None:
            raise ValueError(
                f"rule_labels: no rule matches the param at {path!r} and no default is given"
            )
        return default

    out = _label_tree(params, fn)
    for label, r, _ in compiled:
        if hits[id(r)] == 0:
            raise ValueError(
                f"rule_labels: rule {r!r} of label {label!r} matches no param; paths are "
                f"{leaf_paths(params)[:8]!r}"
            )
    return out


def random_labels(
    params: Any,
    fraction: float,
    *,
    seed: int,
    labels: tuple[Hashable, Hashable] = ("slow", "fast"),
    eligible: Rule | None = None,
) -> Any:
    """A seeded random subset of leaves gets ``labels[0]``, the rest ``labels[1]``.

    Args:
      params: the parameter tree.
      fraction: share of eligible leaves drawn, in (0, 1); at least one is drawn.
      seed: seed of the draw (the same seed gives the same subset).
      labels: (label of drawn leaves, label of the others).
      eligible: rule (as in :func:`rule_labels`) selecting the leaves that may be drawn;
        default: all leaves.

    Raises:
      ValueError: if ``fraction`` is not in (0, 1) or no leaf is eligible.
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    paths = leaf_paths(params)
    if eligible is None:
        ok = paths
    else:
        try:
            tree = rule_labels(params, {True: eligible}, default=False)
        except ValueError as e:
            raise ValueError(f"random_labels: eligible={eligible!r}: {e}") from None
        ok = [p for p, e in zip(paths, jax.tree.leaves(tree)) if e]
    if not ok:
        raise ValueError(f"random_labels: no param is eligible under {eligible!r}")
    rng = np.random.default_rng(seed)
    n = max(1, int(round(fraction * len(ok))))
    drawn = set(rng.choice(len(ok), size=n, replace=False).tolist())
    chosen = {ok[i] for i in drawn}
    return _label_tree(params, lambda p, _: labels[0] if p in chosen else labels[1])
