"""Width growth: Flax variables, batch-norm statistics and optimizer state of the next stage.

:func:`grow` maps the variables and optimizer state of stage ``s`` to those of stage ``s + 1``
for any model that follows the naming contract of :mod:`optax_multirate.models`:

* **pairing**: new output slots of a layer come as a duplicated block ``[V; V]`` and new input
  slots of its consumer as ``[Z, -Z]``, so the two copies cancel and the function is unchanged;
* **variance transfer** (VT): the old block of every layer whose fan-in grows is scaled by
  ``s = sqrt(fan_in_old / fan_in_new)``; batch-norm running statistics follow (mean by ``s``,
  variance by ``s**2``); without batch norm the activations carry the product of the scales and
  the head divides it back out (``exact=True``), so logits are unchanged to float precision;
* the optimizer state is rebuilt with ``optimizer.init(new_params)`` and the old values carried
  over leaf by leaf (``momentum="reset"``: zeros in grown leaves; ``"carry"``: old block plus
  zeros; integer birth ids: old block plus ``stage + 1``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_multirate import _checks
from optax_multirate import labels as labels_lib
from optax_multirate.growing.rate_adaptation import GrowthLRAState, sq_norms_of

__all__ = ["grow"]


@dataclasses.dataclass
class _Layer:
    """One layer of the naming contract: a kernel, its bias, the batch norm after it."""

    path: tuple[str, ...]  # module path in params
    src: str  # stream it reads
    dst: str  # stream it writes ("" for the head)
    bn: tuple[str, ...] | None = None


_ANY_MODEL = "grow_variables (Linen) and grow_module (NNX) grow any model into its wider twin"
_BLOCK_NAMES = {"Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1", "proj", "proj_bn"}


def _num(name: str, prefix: str) -> int | None:
    m = re.fullmatch(prefix + r"_(\d+)", name)
    return int(m.group(1)) if m else None


def _graph(params: dict) -> list[_Layer]:
    """Layers in forward order from the naming contract of ``optax_multirate.models``."""
    names = set(params)
    layers: list[_Layer] = []
    if "stem" in names:  # ResNet
        layers.append(_Layer(("stem",), "in", "r0", ("stem_bn",) if "stem_bn" in names else None))
        cur, blocks = (
            "r0",
            sorted(
                (n for n in names if _num(n, "ResBlock") is not None),
                key=lambda n: _num(n, "ResBlock"),
            ),
        )
        for b, name in enumerate(blocks):
            blk = params[name]
            out = f"r{b + 1}" if "proj" in blk else cur
            for conv, src, dst, bn in (
                ("Conv_0", cur, f"{name}.0", "BatchNorm_0"),
                ("Conv_1", f"{name}.0", out, "BatchNorm_1"),
                ("proj", cur, out, "proj_bn"),
            ):
                if conv in blk:
                    has_bn = bn in blk
                    layers.append(_Layer((name, conv), src, dst, (name, bn) if has_bn else None))
            stray = sorted(set(blk) - _BLOCK_NAMES)
            if stray:
                raise ValueError(
                    f"variables: {name}/{stray[0]} does not follow the naming "
                    "contract of optax_multirate.models"
                )
            cur = out
        known = {"stem", "stem_bn", "head", *blocks}
    else:  # MLP / CNN: Conv_i, then Dense_i, then head; BatchNorm_i follows Conv_i (CNN)
        # or Dense_i (MLP)

        def numbered(prefix: str) -> list[str]:
            return sorted((n for n in names if _num(n, prefix) is not None),
                          key=lambda n: _num(n, prefix))  # fmt: skip

        convs, dense = numbered("Conv"), numbered("Dense")
        bns = {n: "BatchNorm_" + n.rsplit("_", 1)[1] for n in (convs or dense)}
        cur = "in"
        for i, name in enumerate(convs + dense):
            bn = bns.get(name)
            layers.append(_Layer((name,), cur, f"s{i}", (bn,) if bn in names else None))
            cur = f"s{i}"
        known = {"head", *convs, *dense, *bns.values()}
    if "head" not in names:
        raise ValueError(
            "variables: no 'head' layer; grow needs the naming contract of optax_multirate.models"
            f" ({_ANY_MODEL})"
        )
    layers.append(_Layer(("head",), cur, ""))
    stray = sorted(names - known)
    if stray:
        raise ValueError(
            f"variables: params {stray!r} do not follow the naming contract of "
            f"optax_multirate.models (see its module docstring; {_ANY_MODEL})"
        )
    return layers


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _rng(key: jax.Array, index: int) -> np.random.Generator:
    """A numpy generator seeded by ``(key, index)`` (no XLA compile per shape, as a draw with
    ``jax.random`` would need on every new shape)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng([*np.asarray(key, np.uint32).ravel().tolist(), index])


def _draw(key: jax.Array, index: int, shape: tuple[int, ...], new_init: Any) -> np.ndarray:
    """New entries: lecun normal at the new fan-in (Flax's default), ``mup_sq`` or a callable."""
    if callable(new_init):
        return np.array(new_init(jax.random.fold_in(key, index), shape, jnp.float32), np.float32)
    rng = _rng(key, index)
    z = rng.standard_normal(shape)
    if new_init == "mup_sq":
        return (z / shape[-2]).astype(np.float32)
    bad = np.abs(z) > 2
    while bad.any():  # truncated to [-2, 2] std, as jax.nn.initializers.lecun_normal
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2
    fan_in = int(np.prod(shape[:-1]))
    return (z * np.sqrt(1.0 / fan_in) / 0.87962566103423978).astype(np.float32)


def _grow_kernel(
    old: np.ndarray, shape: tuple[int, ...], mult: float, key: jax.Array, index: int, cfg: dict
) -> np.ndarray:
    """New kernel: drawn, paired (``[Z, -Z]`` inputs, ``[V; V]`` outputs), old block * mult."""
    i0, o0 = old.shape[-2:]
    i1, o1 = shape[-2:]
    new = _draw(key, index, shape, cfg["new_init"])
    if cfg["pairing"]:
        hi, ho = (i1 - i0) // 2, (o1 - o0) // 2
        new[..., i0 + hi :, :] = -new[..., i0 : i0 + hi, :]
        new[..., o0 + ho :] = new[..., o0 : o0 + ho]
        if cfg["pair_noise"] and ho:
            std = cfg["pair_noise"] * float(np.std(new[..., o0 : o0 + ho]))
            noise = _rng(key, (1 << 30) + index).standard_normal(new[..., o0 + ho :].shape)
            new[..., o0 + ho :] += (std * noise).astype(np.float32)
    else:
        new[..., i0:, :] = 0.0  # zero fan-out of new units (GradMax-style)
    new[..., :i0, :o0] = mult * old
    return new


def _pad(old: np.ndarray, shape: tuple[int, ...], fill: float, mult: float = 1.0) -> np.ndarray:
    new = np.full(shape, fill, np.float32 if old.dtype.kind == "f" else old.dtype)
    new[tuple(slice(0, n) for n in old.shape)] = old * mult if mult != 1.0 else old
    return new


def _scale(old: np.ndarray, shape: tuple, cfg: dict, head: bool, depthwise: bool) -> float:
    """Variance-transfer factor of a kernel's old block."""
    i0, i1 = old.shape[-2], shape[-2]
    if cfg["rescale"] is None or i1 == i0 or depthwise:
        return 1.0
    if cfg["rescale"] == "fan_in":
        return (i0 / i1) ** (cfg["head_exponent"] if head else 0.5)
    fan = np.prod(old.shape[:-1]) * (1.0 if cfg["rescale"] == "measured_old" else i1 / i0)
    return float(1.0 / math.sqrt(fan * max(float(np.var(old)), 1e-30)))


def _check_shapes(old_tree: dict, new_tree: dict, name: str) -> dict[str, tuple]:
    """Checks that ``new_tree`` only grows ``old_tree``; returns ``{path: new shape}``."""
    old_p = labels_lib.leaf_paths(old_tree)
    new_flat = jax.tree_util.tree_flatten_with_path(new_tree)[0]
    new_shapes = {labels_lib.path_str(p): tuple(x.shape) for p, x in new_flat}
    if sorted(old_p) != sorted(new_shapes):
        diff = sorted(set(old_p) ^ set(new_shapes))
        raise ValueError(
            f"next_shapes: the leaves of {name!r} differ from the variables at "
            f"{diff[:5]!r} (growth changes shapes only)"
        )
    for path, x in zip(old_p, jax.tree.leaves(old_tree)):
        a, b = tuple(np.shape(x)), new_shapes[path]
        growable = {len(a) - 1, len(a) - 2} if len(a) >= 2 else {len(a) - 1}
        bad = len(a) != len(b) or any(
            (q < p) or (q != p and ax not in growable) for ax, (p, q) in enumerate(zip(a, b))
        )
        if bad:
            raise ValueError(
                f"next_shapes: {name}/{path} goes from {a} to {b}; grow may only "
                f"enlarge the last axis (and the input axis of a kernel); {_ANY_MODEL}"
            )
    return new_shapes


def grow(
    variables: dict,
    opt_state: optax.OptState | None,
    stage: int,
    *,
    key: jax.Array | None,
    next_shapes: dict,
    optimizer: optax.GradientTransformation | None = None,
    exact: bool = True,
    rescale: str | None = "fan_in",
    head_exponent: float = 0.5,
    new_init: str | Callable[..., jax.Array] = "fan_in",
    momentum: str = "reset",
    pairing: bool = True,
    pair_noise: float = 0.0,
    num_stages: int | None = None,
    bn_epsilon: float = 1e-5,
) -> tuple[dict, optax.OptState | None]:
    """Grows Flax variables and optimizer state from stage ``stage`` to ``stage + 1``.

    Works on any model that follows the naming contract of :mod:`optax_multirate.models`
    (``MLP``, ``CNN``, ``ResNet``, with or without batch norm). For a kernel ``(..., in, out)``
    the new output slots are ``[V; V]`` and the new input slots ``[Z, -Z]``, drawn with
    ``new_init`` at the new width; the old block is multiplied by the variance-transfer scale
    ``s = sqrt(in_old / in_new)`` (``rescale``). New biases are 0, new batch-norm scales 1, new
    running means 0 and variances 1; old running means are multiplied by the scale ``p`` of the
    layer in front, variances by ``p**2``. Without batch norm, positive scales pass through
    ReLU: a hidden layer's bias is multiplied by its cumulative scale ``A``, and the head's old
    block by ``1 / A`` (``exact=True``), so logits are unchanged; ``exact=False`` (the paper's
    approximate form) rescales the head by ``(in_old / in_new) ** head_exponent`` instead, and
    logits scale by that times ``A``. In a residual stream without batch norm, the first writer
    in forward order (stem, each stage's first block's ``Conv_1``) sets the stream's scale and
    the other writers match it instead of applying their own ``s``.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of stage ``stage``.
      opt_state: the optimizer state for ``variables["params"]``, or None.
      stage: the current stage (``0 <= stage < num_stages - 1``).
      key: PRNG key of the new entries: with each kernel's index in sorted-path order it seeds
        a numpy generator (the same key gives the same growth).
      next_shapes: the variables of stage ``stage + 1`` or their shapes, e.g.
        ``jax.eval_shape(functools.partial(model.init, train=False), key, x)``.
      optimizer: the transformation that made ``opt_state`` (its ``init`` builds the new state).
      exact: keep logits exactly unchanged (True), or rescale the head as the paper does.
      rescale: ``"fan_in"`` (variance transfer), ``None`` (no rescaling), ``"measured_old"`` or
        ``"measured_new"`` (pick ``s`` so that ``Var[s W_old] = 1 / fan_in_old`` or ``_new``).
      head_exponent: exponent of the head's scale with ``exact=False`` (1.0: the muP rule).
      new_init: ``"fan_in"`` (lecun normal at the new fan-in), ``"mup_sq"`` (std
        ``1 / in_new``) or an initializer ``(key, shape, dtype) -> array``.
      momentum: ``"reset"`` (grown float state leaves become zeros) or ``"carry"`` (old block
        plus zeros). Leaves whose shape is unchanged (counts, schedules) are copied.
      pairing: pair new units (exact; even increments). ``False``: new units get zero fan-out
        instead (exact, any increment).
      pair_noise: noise (relative to the draws' std) added to the second copy of ``V``; it
        breaks exactness (0 keeps it).
      num_stages: number of stages; by default read from a :func:`growth_lr_adaptation` state.
      bn_epsilon: the batch norms' epsilon (the models' and Flax's default): running variances
        become ``p**2 * (var + eps) - eps``, so eval mode is exact; train mode (batch
        statistics) is exact up to ``eps / var``.

    Returns:
      ``(variables, opt_state)`` of stage ``stage + 1`` (opt_state None if it was None).

    Raises:
      TypeError: for an argument of the wrong type: a ``key`` that is not an array (None),
        ``variables`` or ``next_shapes`` that are not mappings, an ``optimizer`` that is not a
        ``GradientTransformation``, a non-int ``stage``, a non-bool flag, ...
      ValueError: for a ``stage`` out of range, ``next_shapes`` that shrink, leave every width
        unchanged, change a non-growth axis or grow a stream unequally, an odd increment with
        ``pairing=True``, params outside the naming contract, an ``opt_state`` without its
        ``optimizer`` or whose structure differs from ``optimizer.init(new_params)``, a birth
        id ``>= num_stages``, or an option value out of range.

    Examples:
      >>> import functools, jax, jax.numpy as jnp
      >>> from optax_multirate.models import MLP
      >>> x = jnp.ones((2, 3))
      >>> v = MLP(features=(4,), num_classes=2).init(jax.random.key(0), x)
      >>> big = MLP(features=(6,), num_classes=2)
      >>> shapes = jax.eval_shape(functools.partial(big.init, train=False), jax.random.key(0), x)
      >>> v2, _ = grow(v, None, 0, key=jax.random.key(1), next_shapes=shapes)
      >>> v2["params"]["Dense_0"]["kernel"].shape
      (3, 6)
      >>> old = MLP(features=(4,), num_classes=2).apply(v, x)
      >>> print(bool(jnp.abs(big.apply(v2, x) - old).max() < 1e-6))
      True
    """
    stage = _checks.check_int("stage", stage, low=0)
    if not isinstance(key, (jax.Array, np.ndarray)):
        raise TypeError(f"key must be a PRNG key, got {key!r} ({type(key).__name__})")
    _checks.check_choice("rescale", rescale, (None, "fan_in", "measured_old", "measured_new"))
    if not callable(new_init):
        _checks.check_choice("new_init", new_init, ("fan_in", "mup_sq"))
    _checks.check_choice("momentum", momentum, ("reset", "carry"))
    _checks.check_bool("exact", exact)
    _checks.check_bool("pairing", pairing)
    _checks.check_real("head_exponent", head_exponent, low=0.0, low_open=True)
    _checks.check_real("pair_noise", pair_noise, low=0.0)
    _checks.check_real("bn_epsilon", bn_epsilon, low=0.0)
    num_stages = _checks.check_int("num_stages", num_stages, low=1, optional=True)
    if opt_state is not None:
        if optimizer is None:
            raise ValueError("optimizer must be given to grow an opt_state")
        _checks.check_transformation("optimizer", optimizer)
    if num_stages is None and opt_state is not None:
        num_stages = _lra_num_stages(opt_state)
    if num_stages is not None and stage >= num_stages - 1:
        raise ValueError(f"stage must be < num_stages - 1 = {num_stages - 1}, got {stage}")
    for name, tree in (("variables", variables), ("next_shapes", next_shapes)):
        if not isinstance(tree, Mapping):
            raise TypeError(f"{name} must be a dict of Flax collections, got {type(tree).__name__}")
    if "params" not in variables:
        raise ValueError(f"variables must hold 'params', got collections {sorted(variables)}")
    variables = flax.core.unfreeze(variables)
    next_shapes = flax.core.unfreeze(next_shapes)
    if set(variables) != set(next_shapes):
        raise ValueError(
            f"next_shapes has collections {sorted(next_shapes)}, the variables {sorted(variables)}"
        )
    shapes = {c: _check_shapes(variables[c], next_shapes[c], c) for c in variables}
    if all(
        shapes[c][p] == tuple(np.shape(x))
        for c in variables
        for p, x in zip(labels_lib.leaf_paths(variables[c]), jax.tree.leaves(variables[c]))
    ):
        raise ValueError(
            f"next_shapes grows nothing: stage {stage + 1} has the widths of stage {stage}"
        )
    cfg = dict(
        rescale=rescale,
        head_exponent=head_exponent,
        new_init=new_init,
        pairing=pairing,
        pair_noise=pair_noise,
    )
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), variables["params"])
    stats = jax.tree.map(lambda x: np.asarray(x, np.float32), variables.get("batch_stats", {}))
    index = {p: i for i, p in enumerate(labels_lib.leaf_paths(params))}
    new_params = jax.tree.map(lambda x: x, params)
    new_stats = jax.tree.map(lambda x: x, stats)

    def put(tree: dict, path: tuple[str, ...], leaf: str, value: np.ndarray) -> None:
        _get(tree, path)[leaf] = value

    widths: dict[str, tuple[int, int]] = {}
    factor: dict[str, float] = {"in": 1.0}
    for layer in _graph(params):
        pstr = "/".join(layer.path)
        mod = _get(params, layer.path)
        if "kernel" not in mod:
            raise ValueError(f"variables: layer {pstr!r} has no kernel")
        old = mod["kernel"]
        shape = shapes["params"][pstr + "/kernel"]
        i0, i1 = old.shape[-2], shape[-2]
        o0, o1 = old.shape[-1], shape[-1]
        w_src = widths.get(layer.src, (i0, i1))
        depthwise = i0 == 1 and w_src[0] != 1
        if depthwise:
            w_in = w_src
            if o0 != w_src[0] or o1 != w_src[1]:
                raise ValueError(f"next_shapes: depthwise {pstr!r} must grow with its input")
        elif (i0, i1) != w_src:
            raise ValueError(
                f"next_shapes: {pstr!r} reads {i0}->{i1} channels but its input "
                f"grows {w_src[0]}->{w_src[1]} (1 < groups < C, a flatten, or an "
                "unequal residual stream are not supported)"
            )
        else:
            w_in = (i0, i1)
        if layer.src == "in" and i1 != i0:
            raise ValueError(f"next_shapes: the input layer {pstr!r} may not grow its fan-in")
        if layer.dst == "" and o1 != o0:
            raise ValueError(f"next_shapes: the head may not grow its classes ({o0}->{o1})")
        if layer.dst:
            if widths.setdefault(layer.dst, (o0, o1)) != (o0, o1):
                raise ValueError(
                    f"next_shapes: the residual stream written by {pstr!r} grows "
                    f"{o0}->{o1}, its other writers {widths[layer.dst]}"
                )
        for k in {w_in[1] - w_in[0], o1 - o0} - {0}:
            if pairing and k % 2:
                raise ValueError(
                    f"next_shapes: {pstr!r} grows by {k} units, an odd number; "
                    "pairing=True needs even increments (pairing=False allows odd)"
                )
        a_in = factor[layer.src]
        s = _scale(old, shape, cfg, layer.dst == "", depthwise)
        target = 1.0  # output factor wanted from a batch-norm writer
        if layer.dst == "":
            mult = 1.0 / a_in if exact else s
        elif layer.dst in factor:  # a later writer of a residual stream matches its scale
            target = factor[layer.dst]
            mult = s if layer.bn else target / a_in
        else:
            mult = s
            factor[layer.dst] = 1.0 if layer.bn else s * a_in
        pre = mult * a_in  # factor of the pre-activation (before any batch norm)
        new_kernel = _grow_kernel(old, shape, mult, key, index[pstr + "/kernel"], cfg)
        put(new_params, layer.path, "kernel", new_kernel)
        if "bias" in mod:
            put(
                new_params,
                layer.path,
                "bias",
                _pad(mod["bias"], shapes["params"][pstr + "/bias"], 0.0, pre),
            )
        if layer.bn:
            bstr = "/".join(layer.bn)
            bn_p, bn_s = _get(params, layer.bn), _get(stats, layer.bn)
            for leaf, fill in (("scale", 1.0), ("bias", 0.0)):
                if leaf in bn_p:
                    put(
                        new_params,
                        layer.bn,
                        leaf,
                        _pad(bn_p[leaf], shapes["params"][f"{bstr}/{leaf}"], fill, target),
                    )
            mean = _pad(bn_s["mean"], shapes["batch_stats"][f"{bstr}/mean"], 0.0, pre)
            var = _pad(bn_s["var"], shapes["batch_stats"][f"{bstr}/var"], 1.0)
            # var + eps becomes pre**2 * (var + eps): eval mode stays exact despite eps
            n = bn_s["var"].shape[0]
            var[:n] = np.maximum(pre * pre * (var[:n] + bn_epsilon) - bn_epsilon, 0.0)
            put(new_stats, layer.bn, "mean", mean)
            put(new_stats, layer.bn, "var", var)

    def cast(new: np.ndarray, old: Any) -> jax.Array:  # jnp.asarray would compile per shape
        return jax.device_put(new.astype(np.asarray(old).dtype))

    out = dict(variables)
    out["params"] = jax.tree.map(cast, new_params, variables["params"])
    if "batch_stats" in variables:
        out["batch_stats"] = jax.tree.map(cast, new_stats, variables["batch_stats"])
    if opt_state is None:
        return out, None
    new_state = _grow_state(opt_state, out["params"], optimizer, stage, momentum, num_stages)
    return out, new_state


def _lra_num_stages(opt_state: optax.OptState) -> int | None:
    """``num_stages`` of the :func:`growth_lr_adaptation` states in ``opt_state`` (None if none)."""
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, "GrowthLRAState", filtering=lambda _, v: isinstance(v, GrowthLRAState)
    )
    stages = {int(state.ratios.shape[-1]) for _, state in found}
    if len(stages) > 1:
        raise ValueError(
            f"opt_state holds growth_lr_adaptation states of num_stages {sorted(stages)}; "
            "pass num_stages"
        )
    return stages.pop() if stages else None


def _grow_state(
    opt_state: optax.OptState,
    new_params: optax.Params,
    optimizer: optax.GradientTransformation,
    stage: int,
    momentum: str,
    num_stages: int | None,
) -> optax.OptState:
    """``optimizer.init(new_params)`` with the old values carried over leaf by leaf.

    Only the structure, shapes and dtypes of the new state are needed, so ``init`` is traced
    with ``jax.eval_shape`` (nothing compiles) and every leaf is built in numpy.
    """
    fresh = jax.eval_shape(optimizer.init, new_params)
    old_leaves, old_def = jax.tree.flatten(opt_state)
    new_leaves, new_def = jax.tree.flatten(fresh)
    if old_def != new_def:
        raise ValueError(
            "opt_state does not match optimizer.init(new_params): was it made by "
            f"this optimizer?\n  opt_state: {old_def}\n  init: {new_def}"
        )
    out = []
    for leaf, n in zip(old_leaves, new_leaves):
        if tuple(np.shape(leaf)) == tuple(n.shape):
            out.append(leaf)
            continue
        o = np.asarray(leaf)
        if o.ndim != len(n.shape) or any(a > b for a, b in zip(o.shape, n.shape)):
            raise ValueError(f"opt_state: a leaf of shape {o.shape} cannot grow to {n.shape}")
        if o.dtype.kind in "iu":  # birth ids
            if num_stages is not None and stage + 1 >= num_stages:
                raise ValueError(f"num_stages={num_stages} has no stage {stage + 1}")
            new = _pad(o, n.shape, stage + 1)
        elif momentum == "carry":
            new = _pad(o, n.shape, 0.0)
        else:
            new = np.zeros(n.shape, np.float32)
        out.append(jax.device_put(new.astype(n.dtype)))
    state = jax.tree.unflatten(new_def, out)

    def lra(s: GrowthLRAState) -> GrowthLRAState:  # stale, and the new stage's norms recorded
        per_layer = s.sq_norms.ndim == 2
        sq = sq_norms_of(new_params, s.birth, s.ratios.shape[-1], per_layer=per_layer, host=True)
        return s._replace(lra_stale=jnp.asarray(True), sq_norms=jax.device_put(sq))

    is_lra = lambda x: isinstance(x, GrowthLRAState)  # noqa: E731
    return jax.tree.map(lambda x: lra(x) if is_lra(x) else x, state, is_leaf=is_lra)
