"""Width growth of any Flax model into its wider twin: :func:`grow_variables`, :func:`grow_module`.

The user builds the wider model (the same parameter tree, some axes larger); these functions
map the old variables and optimizer state into it so that the function is unchanged, as
:func:`~optax_multirate.growing.grow` does for the library's own models, with no naming
contract. Which axes grew comes from the shapes; which grow together, and how, from one
eval-mode forward pass of the old model (its jaxpr; nothing runs):

* **pairing**: the new slots of a grown axis come in two halves; along an axis that a kernel
  contracts (its input slots) the second half is the negated first (``[Z, -Z]``), along any
  other axis (output units, biases, norm scales and statistics, embeddings) it is a copy
  (``[V; V]``). Copies compute the same value and the contractions cancel them, so the
  function is unchanged whatever the new values are; they are the wider model's own
  initial values (or drawn, when only shapes are given);
* **variance transfer**: the old block of a kernel whose fan-in grows is scaled by
  ``s = sqrt(fan_in_old / fan_in_new)`` where a batch norm reads its output directly (with
  the kernel's bias): the norm's running mean follows by ``s``, its variance by ``s**2``, so
  eval mode is unchanged. Elsewhere the old block is kept (``s = 1``): in an arbitrary graph a
  scale does not pass unchanged through residual sums, GELU or LayerNorm;
* **refusals**: a layer where pairing cannot keep the function raises a ``ValueError``
  naming it and why: a LayerNorm, RMSNorm or GroupNorm over a grown axis, an attention whose
  head dimension grows (grow the number of heads instead), a reshape that splits or merges a
  grown axis (heads split from the features, a flatten before a Dense), a reduction over a
  grown axis, a model output that grows;
* the optimizer state is rebuilt as :func:`~optax_multirate.growing.grow` does it
  (``optimizer.init`` of the new params, old values carried over leaf by leaf).

Scanned stacks (``nn.scan``, ``nnx.scan``) grow slice by slice: their stacked axis keeps
its length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optax_multirate import _checks, _forward
from optax_multirate.growing import _pairs
from optax_multirate.growing.widen import _grow_state, _lra_num_stages

__all__ = ["grow_variables", "grow_module"]


def _check_options(
    stage: Any, key: Any, rescale: Any, momentum: Any, pairing: Any, num_stages: Any, eps: Any
) -> tuple[int, int | None]:
    stage = _checks.check_int("stage", stage, low=0)
    if key is not None and not isinstance(key, (jax.Array, np.ndarray)):
        raise TypeError(f"key must be a PRNG key or None, got {key!r} ({type(key).__name__})")
    _checks.check_choice("rescale", rescale, (None, "fan_in"))
    _checks.check_choice("momentum", momentum, ("reset", "carry"))
    _checks.check_bool("pairing", pairing)
    _checks.check_real("bn_epsilon", eps, low=0.0)
    num_stages = _checks.check_int("num_stages", num_stages, low=1, optional=True)
    return stage, num_stages


def _shape_check(
    names: Sequence[str], new_names: Sequence[str], old: Sequence, new: Sequence, what: str
) -> None:
    """The wider model has the same leaves, none smaller, some larger."""
    if list(new_names) != list(names):
        diff = sorted(set(names) ^ set(new_names))
        raise ValueError(
            f"{what} has other leaves than the model's variables, at {diff[:5]!r} (growth "
            "changes shapes only)"
        )
    for name, a, b in zip(names, old, new):
        a, b = tuple(np.shape(a)), tuple(b.shape)
        if len(a) != len(b) or any(q < p for p, q in zip(a, b)):
            raise ValueError(
                f"{what}: {name!r} goes from {a} to {b}; growth keeps each axis or enlarges it"
            )
    if all(tuple(np.shape(a)) == tuple(b.shape) for a, b in zip(old, new)):
        raise ValueError(f"{what} grows nothing: every variable keeps its shape")


def _place(leaves: list[Any]) -> list[Any]:
    """Grown numpy leaves onto the device (``jnp.asarray`` would compile per shape)."""
    return [jax.device_put(x) if isinstance(x, np.ndarray) else x for x in leaves]


# --------------------------------------------------------------------------- Linen


def grow_variables(
    model: nn.Module,
    variables: Mapping[str, Any],
    next_variables: Mapping[str, Any],
    *args: Any,
    opt_state: optax.OptState | None = None,
    optimizer: optax.GradientTransformation | None = None,
    stage: int = 0,
    key: jax.Array | None = None,
    rescale: str | None = "fan_in",
    momentum: str = "reset",
    pairing: bool = True,
    num_stages: int | None = None,
    bn_epsilon: float = 1e-5,
    **kwargs: Any,
) -> tuple[dict[str, Any], optax.OptState | None]:
    """Grows a Linen model's variables (and optimizer state) into its wider twin's shapes.

    For any Flax Linen model whose wider version has the same variable tree with some axes
    larger (a ViT with wider MLPs or more heads, a ``layers_0..layers_11`` MLP, an
    ``nn.scan`` stack): the module docstring says how, and which layers it refuses. The
    forward pass ``model.apply(variables, *args, **kwargs)`` is traced once (nothing runs);
    call it in eval mode (``train=False``, ``deterministic=True``), so that batch norms read
    their running statistics.

    Args:
      model: the Linen module of the current variables.
      variables: its variables (``{"params": ..., "batch_stats": ...}``).
      next_variables: the wider model's variables, ``wider.init(key, x, ...)`` (their values
        are the new entries), or their shapes (``jax.eval_shape`` of it; new entries are then
        drawn from ``key``: kernels lecun normal, scales and variances 1, the rest 0).
      *args: example inputs of the forward pass (only shapes matter).
      opt_state: the optimizer state for ``variables["params"]``, or None.
      optimizer: the transformation that made ``opt_state`` (its ``init`` builds the new one).
      stage: the current stage; grown integer leaves of the optimizer state (the birth ids of
        :func:`~optax_multirate.growing.growth_lr_adaptation`) get ``stage + 1``.
      key: PRNG key of the draws when ``next_variables`` holds shapes.
      rescale: ``"fan_in"`` (variance transfer where a batch norm absorbs it) or None.
      momentum: ``"reset"`` (grown float state leaves become zeros) or ``"carry"`` (old block
        plus zeros); leaves whose shape is unchanged are copied.
      pairing: pair new units (even increments); False: new units get zero fan-out instead.
      num_stages: number of stages; by default read from a ``growth_lr_adaptation`` state.
      bn_epsilon: the batch norms' epsilon (running variances become
        ``s**2 (var + eps) - eps``).
      **kwargs: keyword arguments of the forward pass (e.g. ``train=False``).

    Returns:
      ``(variables, opt_state)`` shaped like ``next_variables`` (opt_state None if it was).

    Raises:
      TypeError: for an argument of the wrong type.
      ValueError: naming the layer or variable: for ``next_variables`` with other leaves, a
        shrinking or unchanged model, a layer whose growth cannot keep the function (see the
        module docstring), an odd increment with ``pairing=True``, an ``opt_state`` without
        its ``optimizer`` or not made by it, or an option out of range.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> class Deep(nn.Module):           # no naming contract: layers_0, layers_1, out
      ...     width: int
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         for i in range(2):
      ...             x = nn.relu(nn.Dense(self.width, name=f"layers_{i}")(x))
      ...         return nn.Dense(3, name="out")(x)
      >>> x = jnp.ones((2, 4))
      >>> small, wide = Deep(8), Deep(12)
      >>> v = small.init(jax.random.key(0), x)
      >>> v2, _ = grow_variables(small, v, wide.init(jax.random.key(1), x), x)
      >>> v2["params"]["layers_1"]["kernel"].shape
      (12, 12)
      >>> print(bool(jnp.abs(wide.apply(v2, x) - small.apply(v, x)).max() < 1e-5))
      True
    """
    stage, num_stages = _check_options(
        stage, key, rescale, momentum, pairing, num_stages, bn_epsilon
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
    for name, tree in (("variables", variables), ("next_variables", next_variables)):
        if not isinstance(tree, Mapping) or "params" not in tree:
            raise TypeError(f"{name} must be a dict of Flax collections with 'params', got "
                            f"{type(tree).__name__}")  # fmt: skip
    variables, next_variables = flax.core.unfreeze(variables), flax.core.unfreeze(next_variables)
    num_stages = _opt_checks(opt_state, optimizer, num_stages, stage)
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    names = [_linen_name(p) for p, _ in flat]
    params = [_forward.key_parts(p)[0] == "params" for p, _ in flat]
    old = [x for _, x in flat]
    new_flat = jax.tree_util.tree_flatten_with_path(next_variables)[0]
    new_names = [_linen_name(p) for p, _ in new_flat]
    new = [x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x) for _, x in new_flat]
    new = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) if isinstance(x, jax.ShapeDtypeStruct)
           else x for x in new]  # fmt: skip
    _shape_check(names, new_names, old, new, "next_variables")
    types: dict[tuple, type] = {}

    def interceptor(next_fun, iargs, ikwargs, context):
        if context.method_name == "__call__":
            types.setdefault(tuple(context.module.path), type(context.module))
        return next_fun(*iargs, **ikwargs)

    def call(leaves, a, k):
        with nn.intercept_methods(interceptor):
            y, _ = model.apply(treedef.unflatten(leaves), *a, mutable=True, **k)
        return y

    run, inputs = _forward_fn(args, kwargs, len(old), call)
    closed = jax.make_jaxpr(run)(*old, *inputs)
    grown = _pairs.grow(
        names, params, old, new, closed, types,
        key=key, rescale=rescale, pairing=pairing, eps=bn_epsilon,
    )  # fmt: skip
    out = jax.tree_util.tree_unflatten(treedef, _place(grown))
    if opt_state is None:
        return out, None
    state = _grow_state(opt_state, out["params"], optimizer, stage, momentum, num_stages)
    return out, state


def _linen_name(path: Any) -> str:
    """``Dense_0/kernel`` for a param, ``batch_stats/BatchNorm_0/mean`` for another variable."""
    parts = _forward.key_parts(path)
    return _forward.joined(parts[1:] if parts[0] == "params" else parts)


def _forward_fn(args: tuple, kwargs: dict, n: int, call: Any) -> tuple[Any, list]:
    """``fn(*variables, *arrays)`` calling ``call(variables, args, kwargs)`` with the arrays
    of ``args`` and ``kwargs`` traced (the rest, such as ``train=False``, kept static)."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

    def fn(*xs):
        filled = list(leaves)
        for i, x in zip(traced, xs[n:]):
            filled[i] = x
        a, k = treedef.unflatten(filled)
        return call(xs[:n], a, k)

    return fn, [leaves[i] for i in traced]


def _opt_checks(opt_state: Any, optimizer: Any, num_stages: int | None, stage: int) -> int | None:
    if opt_state is not None:
        if optimizer is None:
            raise ValueError("optimizer must be given to grow an opt_state")
        _checks.check_transformation("optimizer", optimizer)
        if num_stages is None:
            num_stages = _lra_num_stages(opt_state)
    if num_stages is not None and stage >= num_stages - 1:
        raise ValueError(f"stage must be < num_stages - 1 = {num_stages - 1}, got {stage}")
    return num_stages


# --------------------------------------------------------------------------- NNX


def grow_module(
    model: nnx.Module,
    next_model: nnx.Module,
    *args: Any,
    optimizer: nnx.Optimizer | optax.GradientTransformation | None = None,
    opt_state: optax.OptState | None = None,
    stage: int = 0,
    key: jax.Array | None = None,
    rescale: str | None = "fan_in",
    momentum: str = "reset",
    pairing: bool = True,
    num_stages: int | None = None,
    bn_epsilon: float = 1e-5,
    **kwargs: Any,
) -> nnx.Optimizer | optax.OptState | None:
    """Grows an NNX model into its wider twin, in place, and its optimizer with it.

    The NNX form of :func:`grow_variables`: ``next_model`` is the wider model the user built
    (its own initial values are the new entries; built abstractly with ``nnx.eval_shape``,
    the new entries are drawn from ``key``); its params, batch statistics and other state are
    overwritten with the old model's, grown. The forward pass ``model(*args,
    **kwargs)`` is traced once, on a copy in eval mode (``.eval()``), so ``model`` is not
    changed.

    Args:
      model: the current NNX model.
      next_model: the wider model (same attributes, some axes larger); updated in place.
      *args: example inputs of the forward pass (only shapes matter).
      optimizer: an ``nnx.Optimizer`` of ``model`` (a new one for ``next_model`` is returned,
        its state grown, its step kept), or the transformation of ``opt_state``.
      opt_state: with a transformation as ``optimizer``: its state (pure arrays, e.g.
        ``nnx.as_pure(nnx_optimizer.opt_state)``), grown and returned.
      stage: see :func:`grow_variables` (and every other keyword).
      key: see :func:`grow_variables`.
      rescale: see :func:`grow_variables`.
      momentum: see :func:`grow_variables`.
      pairing: see :func:`grow_variables`.
      num_stages: see :func:`grow_variables`.
      bn_epsilon: see :func:`grow_variables`.
      **kwargs: keyword arguments of the forward pass.

    Returns:
      A new ``nnx.Optimizer`` for ``next_model`` when ``optimizer`` is one, the grown
      ``opt_state`` when it is given, else None.

    Raises:
      TypeError: for an argument of the wrong type.
      ValueError: as :func:`grow_variables`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, width, rngs):
      ...         self.body = nnx.Linear(4, width, rngs=rngs)
      ...         self.bn = nnx.BatchNorm(width, rngs=rngs)
      ...         self.head = nnx.Linear(width, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.head(nnx.relu(self.bn(self.body(x))))
      >>> small, x = Net(8, nnx.Rngs(0)), jnp.ones((2, 4))
      >>> opt = nnx.Optimizer(small, optax.adam(1e-3), wrt=nnx.Param)
      >>> wide = Net(12, nnx.Rngs(1))
      >>> opt = grow_module(small, wide, x, optimizer=opt)
      >>> small.eval(); wide.eval()
      >>> wide.body.kernel.shape, opt.opt_state[0].mu["head"]["kernel"].shape
      ((4, 12), (12, 3))
      >>> print(bool(jnp.abs(wide(x) - small(x)).max() < 1e-5))
      True
    """
    stage, num_stages = _check_options(
        stage, key, rescale, momentum, pairing, num_stages, bn_epsilon
    )
    for name, m in (("model", model), ("next_model", next_model)):
        if not isinstance(m, nnx.Module):
            raise TypeError(f"{name} must be a flax.nnx Module, got {type(m).__name__}")
    nnx_opt = optimizer if isinstance(optimizer, nnx.Optimizer) else None
    if nnx_opt is not None:
        if opt_state is not None:
            raise ValueError("opt_state comes from the nnx.Optimizer; leave it None")
        tx, opt_state = nnx_opt.tx, nnx.as_pure(nnx_opt.opt_state)
    else:
        tx = optimizer
    num_stages = _opt_checks(opt_state, tx, num_stages, stage)
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    variables = jax.tree.leaves(state, is_leaf=_forward.is_variable)
    names = [_forward.joined(_forward.key_parts(p)) for p, _ in flat]
    old = [x for _, x in flat]
    _, next_state = nnx.split(next_model)
    next_flat, next_def = jax.tree_util.tree_flatten_with_path(next_state)
    next_names = [_forward.joined(_forward.key_parts(p)) for p, _ in next_flat]
    new = [x for _, x in next_flat]
    _shape_check(names, next_names, old, new, "next_model")
    types = {tuple(p): type(m) for p, m in nnx.iter_modules(model)}

    def call(leaves, a, k):
        copy = nnx.merge(graphdef, treedef.unflatten(leaves))
        copy.eval()
        return copy(*a, **k)

    run, inputs = _forward_fn(args, kwargs, len(old), call)
    closed = jax.make_jaxpr(run)(*old, *inputs)
    params = [isinstance(v, nnx.Param) for v in variables]
    grown = _pairs.grow(
        names, params, old, [np.asarray(x) if _is_float(x) else x for x in new], closed,
        types, key=key, rescale=rescale, pairing=pairing, eps=bn_epsilon,
    )  # fmt: skip
    nnx.update(next_model, next_def.unflatten(_place(grown)))
    if opt_state is None:
        return None
    wrt = nnx_opt.wrt if nnx_opt is not None else nnx.Param
    new_params = nnx.as_pure(nnx.state(next_model, wrt))
    new_state = _grow_state(opt_state, new_params, tx, stage, momentum, num_stages)
    if nnx_opt is None:
        return new_state
    out = nnx.Optimizer(next_model, tx, wrt=wrt)
    slots = jax.tree.leaves(out.opt_state, is_leaf=_forward.is_variable)
    values = jax.tree.leaves(new_state)
    if len(slots) != len(values):
        raise ValueError("the grown optimizer state does not match nnx.Optimizer's")
    for slot, value in zip(slots, values):
        slot.set_value(value)
    out.step.set_value(nnx_opt.step.get_value())
    return out


def _is_float(x: Any) -> bool:
    return not isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.floating)
