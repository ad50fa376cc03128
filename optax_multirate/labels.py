"""Label trees from Flax parameters (Linen params and NNX state alike).

A label tree has the structure of the params and a hashable label at each leaf: exactly what
``optax.partition`` (alias ``multi_transform``) takes. Labels are static Python, computed once
and never traced.

* :func:`depth_labels` gives each leaf its depth unit in **forward order**, taken from the
  order in which params are first read in one abstract forward pass (never from names:
  Flax flattens dicts in sorted key order, so ``Dense_10`` would come before ``Dense_2``).
* :func:`weight_bias_labels` labels leaves ``"weight"`` or ``"bias"``.
* :func:`rule_labels` labels leaves by rules on their paths (e.g. fast head, slow backbone).
* :func:`random_labels` draws a seeded random subset of leaves.
* :func:`check_labels` validates a label tree against params (used by every method at
  ``init``).
* :class:`StackedDepth`, the depth label of a scanned stack's leaf (one depth per slice),
  is read by :func:`~optax_multirate.scale_by_lerac` and refused by partitioning methods.

Paths are written ``"Conv_0/kernel"``: the dict keys from the root of the tree given, joined
with ``/``.

**Flax NNX.** Every helper also takes an ``nnx.State``: Variable-wrapped, as
``nnx.state(model, nnx.Param)`` or ``nnx.split(model, nnx.Param, ...)`` give it, or pure (its
``nnx.as_pure`` form). Paths leave out the ``value`` attribute under which a Variable holds its
array (``"conv1/kernel"``, not ``"conv1/kernel/value"``), and the label tree returned holds the
labels in place of the Variables: the structure of the pure state, which is a prefix of the
Variable-wrapped one. So one label tree serves both calls of ``nnx.Optimizer``: ``tx.init`` on
the Variable-wrapped state and ``tx.update`` on pure arrays, in ``optax.partition`` and in every
method of this library. A helper refuses Variables that hold no trainable parameter
(``nnx.BatchStat``, RNG state, caches): build labels from ``nnx.state(model, nnx.Param)``::

    labels = om.rule_labels(nnx.state(model, nnx.Param), {"fast": "^head/"}, default="slow")
    tx = om.multirate_sgd(learning_rate=0.05, k=2, param_labels=labels)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, grads)        # grads = nnx.grad(loss_fn)(model)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

from optax_multirate import _checks, _forward

__all__ = [
    "StackedDepth",
    "path_str",
    "leaf_paths",
    "check_labels",
    "depth_labels",
    "weight_bias_labels",
    "rule_labels",
    "random_labels",
    "resolve_labels",
]


@dataclasses.dataclass(frozen=True)
class StackedDepth:
    """The depth label of a leaf that stacks layers on one axis: one depth per slice.

    A scanned stack (``nn.scan``, ``nnx.scan``, ``lax.scan`` over layers) keeps its layers in
    each leaf, stacked on one axis; :func:`depth_labels` labels such a leaf with a
    ``StackedDepth`` and :func:`~optax_multirate.scale_by_lerac` gives each slice its depth's
    rate. ``optax.partition`` cannot split a leaf, so every method that partitions by label
    (``multirate``, ``wus``, ``freeze_schedule``, ...) refuses it, naming the leaf.

    Attributes:
      depths: the depth of each slice, in slice order (ints >= 0).
      axis: the stacked axis of the leaf (>= 0).

    Raises:
      TypeError: for depths that are not a sequence of ints, or an axis that is not an int.
      ValueError: for no depth, a negative depth or a negative axis.

    Examples:
      >>> StackedDepth((1, 2, 3))
      StackedDepth(depths=(1, 2, 3), axis=0)
      >>> len({StackedDepth((1, 2)), StackedDepth([1, 2])})   # hashable, compared by value
      1
    """

    depths: tuple[int, ...]
    axis: int = 0

    def __post_init__(self) -> None:
        depths = _checks.check_int_sequence("depths", self.depths, low=0, min_len=1)
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "axis", _checks.check_int("axis", self.axis, low=0))


def path_str(path: Sequence[Any]) -> str:
    """Joins a JAX key path (or a tuple of names) into ``"a/b/c"``.

    A trailing attribute key ``value`` (where an ``nnx.Variable`` holds its array) is left
    out, so a Variable-wrapped NNX state and its pure form have the same paths.

    Examples:
      >>> path_str(("Conv_0", "kernel"))
      'Conv_0/kernel'
      >>> from flax import nnx
      >>> state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
      >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
      ['bias', 'kernel']
    """
    return _forward.joined(_forward.key_parts(path))


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
    allow_stacked: bool = False,
) -> dict[str, Hashable]:
    """Checks that a label tree matches ``params`` and returns ``{path: label}``.

    ``params`` may contain ``optax.MaskedNode`` holes (as inside ``optax.partition``); the label
    tree may then be either the full tree or the holed one: only the leaves of ``params`` are
    looked up, by path.

    Args:
      labels: label tree, or a callable ``params -> label tree``.
      params: the parameter tree (Linen params, or an ``nnx.State``, Variable-wrapped or
        pure: the same label tree matches both).
      allowed: if given, the labels that may appear.
      name: the argument's name, used in error messages.
      require: labels that must label at least one leaf of ``params``.
      allow_stacked: accept :class:`StackedDepth` labels (one depth per slice of a leaf);
        only a transformation that reads each slice's label may (LeRaC's per-layer scaling).

    Returns:
      A dict from the path of each leaf of ``params`` to its label.

    Raises:
      ValueError: naming the path, if a leaf of ``params`` has no label, a label is not
        allowed or not hashable, a required label labels nothing, or a label is a
        :class:`StackedDepth` and ``allow_stacked`` is False.
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
        if isinstance(lab, StackedDepth) and not allow_stacked:
            raise ValueError(
                f"{name}: the label at {path!r} is {lab!r}, one depth per slice of a stacked "
                "leaf (a scanned stack's layers); optax.partition cannot split a leaf, so a "
                "method that partitions by label takes one label per leaf: label the stack "
                "with one value (rule_labels), or use scale_by_lerac, which reads each slice"
            )
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

    The result has the structure of ``params`` (``MaskedNode`` holes kept), with each NNX
    Variable replaced by its label (a prefix of a Variable-wrapped state).
    """
    by_path = check_labels(labels, params, **kwargs)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_forward.is_variable)
    return jax.tree_util.tree_unflatten(treedef, [by_path[path_str(p)] for p, _ in flat])


def _label_tree(params: Any, fn: Callable[[str, Any], Hashable]) -> Any:
    """Maps ``fn(path, array)`` over the leaves; an NNX Variable is replaced by its label."""

    def one(p: Any, x: Any) -> Hashable:
        path = path_str(p)
        if _forward.is_variable(x):
            if isinstance(x, _forward.NOT_TRAINABLE):
                raise ValueError(
                    f"labels are for trainable params, but the state holds a "
                    f"{type(x).__name__} at {path!r}: build labels from "
                    "nnx.state(model, nnx.Param)"
                )
            x = x.get_value()
        return fn(path, x)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_forward.is_variable)


# --------------------------------------------------------------------------- depth


def depth_labels(
    model: nn.Module | nnx.Module,
    variables: Any,
    *args: Any,
    unit_level: int | None = 1,
    merge_norm: bool = True,
    rngs: Any = None,
    **kwargs: Any,
) -> Any:
    """Depth label tree of a Flax model's params, in forward order.

    Depth comes from the order in which params are first read in one abstract forward pass:
    the jaxpr (``jax.make_jaxpr``, nothing runs) of ``model.apply(variables, *args,
    **kwargs)`` for a Linen module, of ``model(*args, **kwargs)`` on a copy of an NNX module.
    So any Flax model works whatever its names, and a param that a module declares for
    itself (a ViT's ``pos_embed``, in ``setup`` or in ``__call__``) lands where it is used.

    Depth units (documented places):

    * a unit is the module at ``unit_level`` below the root that contains the leaf (``1``: the
      root's direct children, so a residual block with its convs, batch norms and projection
      shortcut is one unit); NNX counts modules only, so ``blocks/0`` (an item of an
      ``nnx.List``) is one level; ``unit_level=None`` makes every module that owns params its
      own unit;
    * units are numbered in the order their params are first read; params a module owns
      directly above the unit level (a root's ``pos_embed`` and ``cls_token``) form a unit
      where they are first read, one unit for those read between the same two units;
    * with ``merge_norm`` a normalization layer (batch norm, layer norm: scale and bias) that is
      its own unit joins the unit read just before it (the layer it normalizes), so
      ``stem`` + ``stem_bn`` is depth 0;
    * embeddings come first if read first; the head is the last unit read;
    * a module called twice (shared or tied params) keeps the depth of its first call;
    * a unit that a scan slices whole (``nn.scan``, ``nnx.scan``, ``lax.scan`` over stacked
      layers) is one unit per slice, in run order (``attn_0 mlp_0 attn_1 ...``), its leaves
      labelled :class:`StackedDepth`; a unit holding more than the stack stays one depth (pick
      the ``unit_level`` of the stack); ``nn.vmap``/``nnx.vmap`` slices share one depth.

    Args:
      model: a Flax Linen module, or a Flax NNX module (its state is not changed).
      variables: Linen: the variables (``{"params": ..., "batch_stats": ...}``) or params
        alone. NNX: the state to label, ``nnx.state(model, nnx.Param)`` (Variable-wrapped or
        pure, or a part of it).
      *args: example inputs for the forward pass (only shapes matter).
      unit_level: module depth that defines a unit, or None for one unit per module.
      merge_norm: merge normalization layers into the preceding unit.
      rngs: rngs of the forward pass, if it needs any (Linen: ``apply(rngs=...)``, e.g.
        ``{"dropout": key}``; NNX: passed to the call as ``rngs=``).
      **kwargs: keyword arguments of the forward pass (e.g. ``train=False``).

    Returns:
      A tree with the structure of ``variables["params"]`` (Linen) or of the given state,
      each NNX Variable replaced by its depth (see the module docstring): ints ``0..n-1``, and
      a :class:`StackedDepth` at each leaf of a scanned stack. Only LeRaC reads a
      ``StackedDepth``; every partitioning method refuses it.

    Raises:
      TypeError: if ``model`` is not a Flax module, ``unit_level`` not an int or None.
      ValueError: if ``unit_level < 1``, a param is never read in the forward pass, a stack
        is scanned twice (a scan over the slices of a stacked leaf), or the NNX state holds a
        path that is no ``nnx.Param`` of the model.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_multirate.models import MLP
      >>> m = MLP(features=(8,) * 11, num_classes=3)
      >>> v = m.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> d = depth_labels(m, v, jnp.zeros((1, 4)))
      >>> d["Dense_2"]["kernel"], d["Dense_10"]["kernel"], d["head"]["bias"]
      (2, 10, 11)

      An NNX model, whose attributes are declared in another order than they are called:

      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.head = nnx.Linear(8, 2, rngs=rngs)
      ...         self.norm = nnx.LayerNorm(8, rngs=rngs)
      ...         self.body = nnx.Linear(4, 8, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.head(self.norm(self.body(x)))
      >>> net = Net(nnx.Rngs(0))
      >>> d = depth_labels(net, nnx.state(net, nnx.Param), jnp.zeros((1, 4)))
      >>> d["body"]["kernel"], d["norm"]["scale"], d["head"]["kernel"]
      (0, 0, 1)
    """
    unit_level = _checks.check_int("unit_level", unit_level, low=1, optional=True)
    merge_norm = _checks.check_bool("merge_norm", merge_norm)
    if rngs is not None:
        kwargs = dict(kwargs, rngs=rngs)
    if isinstance(model, nnx.Module):
        trace = _forward.trace_nnx(model, args, kwargs)
    elif isinstance(model, nn.Module):
        if "params" not in variables:
            variables = {"params": variables}
        trace = _forward.trace_linen(model, variables, args, kwargs)
        variables = variables["params"]
    else:
        raise TypeError(
            f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}"
        )
    depth = _forward.assign_depths(trace, unit_level, merge_norm)

    def lookup(path: str, _: Any) -> int | StackedDepth:
        if path not in depth:
            raise ValueError(
                f"depth_labels: the state holds {path!r}, which is no nnx.Param of the model "
                f"(its params include {sorted(depth)[:5]!r})"
            )
        d = depth[path]
        return d if isinstance(d, int) else StackedDepth(*d)

    return _label_tree(variables, lookup)


# --------------------------------------------------------------------------- weight / bias


def weight_bias_labels(params: Any, *, norm_scale: str = "weight") -> Any:
    """Labels each leaf ``"weight"`` or ``"bias"``.

    Leaves named ``bias`` are biases (dense, conv and normalization offsets); normalization
    ``scale`` leaves are ``norm_scale``; all others (kernels, embeddings) are weights. The name
    is the last part of the path, which for NNX state is the attribute's name (``kernel``,
    ``bias``, ``scale``, ``embedding``), never a Variable's ``value``.

    Args:
      params: the parameter tree (Linen params, or an ``nnx.State`` of ``nnx.Param``).
      norm_scale: ``"weight"`` (default) or ``"bias"``: where normalization scales go.

    Returns:
      A label tree with the structure of ``params`` (NNX: of its pure form).

    Raises:
      TypeError: if ``norm_scale`` is not hashable.
      ValueError: if ``norm_scale`` is not ``"weight"`` or ``"bias"``, or an NNX state holds
        Variables that are no trainable params (``nnx.BatchStat``, RNG state).

    Examples:
      >>> weight_bias_labels({"Dense_0": {"kernel": 0, "bias": 0}, "BatchNorm_0": {"scale": 0}})
      {'BatchNorm_0': {'scale': 'weight'}, 'Dense_0': {'bias': 'bias', 'kernel': 'weight'}}
      >>> from flax import nnx
      >>> bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> nnx.to_pure_dict(weight_bias_labels(nnx.state(bn, nnx.Param)))
      {'bias': 'bias', 'scale': 'weight'}
    """
    _checks.check_choice("norm_scale", norm_scale, ("weight", "bias"))

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
    a callable rule is ``fn(path, leaf) -> bool`` (``leaf``: the array, an NNX Variable's
    value). Leaves no rule matches get ``default``.

    Args:
      params: the parameter tree (Linen params, or an ``nnx.State`` of ``nnx.Param``).
      rules: ``{label: rule or rules}``, e.g. ``{"fast": ["^head/"]}``.
      default: label of unmatched leaves; None makes an unmatched leaf an error.

    Returns:
      A label tree with the structure of ``params`` (NNX: of its pure form).

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
      params: the parameter tree (Linen params, or an ``nnx.State`` of ``nnx.Param``).
      fraction: share of eligible leaves drawn, in (0, 1); at least one is drawn.
      seed: seed of the draw (the same seed gives the same subset).
      labels: (label of drawn leaves, label of the others).
      eligible: rule (as in :func:`rule_labels`) selecting the leaves that may be drawn;
        default: all leaves.

    Returns:
      A label tree with the structure of ``params`` (NNX: of its pure form).

    Raises:
      TypeError: if ``fraction`` is not a real number.
      ValueError: if ``fraction`` is not in (0, 1) or no leaf is eligible.
    """
    _checks.check_real("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
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
