"""LeRaC: a per-layer learning-rate curriculum from depth labels.

Each depth unit ``j`` (0 = nearest the input, ``n-1`` = the head) starts at its own fraction
``r_j`` of the base optimizer's rate, lower the deeper it sits, and grows to the base rate by
tick ``k``. Two growth forms are offered:

* ``mode="paper"`` (the paper's exponential scheduler, straight lines in log space)::

      m_j(u) = r_j ** (1 - min(u, k) / k)

* ``mode="staircase"`` (the authors' code: every rate times ``c`` per tick, capped)::

      m_j(u) = min(1, r_j * c ** u)

with ``u = count // steps_per_tick``. :func:`scale_by_lerac` multiplies each leaf's update by
``m[depth(leaf)]``; it goes **last** in a chain (``optax.chain(base, scale_by_lerac(...))``) so
that it scales the final step, as PyTorch's per-group ``lr`` does (placed before Adam, the
normalisation cancels it). :func:`lerac` builds that chain, :func:`lerac_schedules` offers the
same curriculum as one optax schedule per depth, and :func:`lerac_depth_labels` builds the depth
units (stem + its norm, one per residual block, the head) from a Flax model. The layers of a
scanned stack (``nn.scan``, ``nnx.scan``) share their leaves; their depth label is a
:class:`~optax_multirate.labels.StackedDepth`, and each slice moves at its own depth's rate.

References:
  Croitoru, Ristea, Ionescu, Sebe, `Learning Rate Curriculum
  <https://arxiv.org/abs/2205.09180>`_, IJCV 2024.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_multirate import _checks
from optax_multirate import labels as labels_lib

__all__ = [
    "LeracState",
    "scale_by_lerac",
    "lerac",
    "lerac_schedules",
    "lerac_depth_labels",
]

logger = logging.getLogger(__name__)

_MODES = ("paper", "staircase")
# A unit needs ceil(log_c(1/r) - _TICK_TOL) staircase ticks: r = c**-m lands within float
# rounding of an integer, which must not cost an extra tick.
_TICK_TOL = 1e-6


class LeracState(NamedTuple):
    """State of :func:`scale_by_lerac`.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far (optimizer steps).
      scales: float32 ``[n]``, the per-depth multipliers ``m_j`` applied by the last update
        (at ``init``: those of the first update). The rate of depth ``j`` is the base rate
        times ``scales[j]``; kept for logging and plots.
    """

    count: jax.Array  # int32 []
    scales: jax.Array  # float32 [n]


# --------------------------------------------------------------------------- helpers


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a float64 numpy array, or None when it is traced."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_unit_interval(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` in (0, 1] (traced under inject_hyperparams: checked when built)."""
    _checks.check_real(name, value, low=0.0, high=1.0, low_open=True, optional=optional)


def _check_scales(scales: Any, allow_non_monotone: bool) -> None:
    if _checks.is_traced(scales):
        return
    _checks.check_real_sequence(
        "initial_scales", scales, low=0.0, high=1.0, low_open=True, min_len=1
    )
    r = np.asarray(scales, np.float64)
    if not allow_non_monotone and np.any(np.diff(r) > 0):
        raise ValueError(
            "initial_scales must not increase with depth (pass allow_non_monotone=True to "
            f"allow it), got {tuple(r.tolist())!r}"
        )


def _ticks_needed(r: Any, c: Any) -> Any:
    """Staircase ticks each unit needs to reach 1: ``ceil(log_c(1/r))`` (numpy or jnp)."""
    xp = np if isinstance(r, np.ndarray) and _concrete(c) is not None else jnp
    need = xp.ceil(-xp.log(r) / xp.log(c) - _TICK_TOL)
    return xp.maximum(need, 0)


def _default_scales(n: int, decay: Any, min_scale: Any, head_scale: Any) -> np.ndarray | jax.Array:
    """``r_j = max(decay**j, min_scale)``, the last replaced by ``head_scale`` if given."""
    vals = [_concrete(decay), _concrete(min_scale)]
    if head_scale is not None:
        vals.append(_concrete(head_scale))
    xp = np if all(v is not None for v in vals) else jnp
    dtype = np.float64 if xp is np else jnp.float32
    j = xp.arange(n, dtype=dtype)
    r = xp.maximum(xp.power(xp.asarray(decay, dtype), j), xp.asarray(min_scale, dtype))
    if head_scale is not None:
        r = xp.concatenate([r[:-1], xp.asarray(head_scale, dtype).reshape(1)])
    return r


def _resolve_scales(
    n: int,
    initial_scales: Sequence[float] | jax.Array | None,
    decay: Any,
    min_scale: Any,
    head_scale: Any,
) -> np.ndarray | jax.Array:
    if initial_scales is None:
        return _default_scales(n, decay, min_scale, head_scale)
    if len(initial_scales) != n:
        raise ValueError(
            f"initial_scales has {len(initial_scales)} entries but param_labels has {n} "
            f"depths: {tuple(initial_scales)!r}"
        )
    r = _concrete(initial_scales)
    return r if r is not None else jnp.asarray(initial_scales, jnp.float32)


def _multipliers(u: jax.Array, r: Any, *, mode: str, k: int | None, c: Any) -> jax.Array:
    """The per-depth multipliers ``m`` (float32 ``[n]``) after ``u`` ticks."""
    n = r.shape[0]
    if mode == "paper":
        if k == 0:
            return jnp.ones([n], jnp.float32)
        concrete = isinstance(r, np.ndarray)
        # log(r)/k in float64 where possible: m = exp((k - u) * log(r) / k), exact 1 after k.
        slope = np.log(r) / k if concrete else jnp.log(r) / k
        rem = (k - jnp.minimum(u, k)).astype(jnp.float32)
        m = jnp.exp(rem * jnp.asarray(slope, jnp.float32))
        m = jnp.where(u <= 0, jnp.asarray(r, jnp.float32), m)  # exactly r at tick 0
        return jnp.where(u >= k, jnp.float32(1.0), m)
    need = _ticks_needed(r, c)
    if k is not None:
        need = jnp.minimum(jnp.asarray(need, jnp.float32), k)
    need = jnp.asarray(need, jnp.float32)
    uf = jnp.minimum(u.astype(jnp.float32), need)  # no overflow of c**u
    m = jnp.asarray(r, jnp.float32) * jnp.power(jnp.asarray(c, jnp.float32), uf)
    return jnp.where(uf >= need, jnp.float32(1.0), jnp.minimum(m, 1.0))


def _validate(
    *,
    k: Any,
    initial_scales: Any,
    decay: Any,
    min_scale: Any,
    head_scale: Any,
    mode: Any,
    steps_per_tick: Any,
    c: Any,
    allow_non_monotone: bool,
) -> tuple[int | None, int]:
    """Checks the curriculum's arguments; returns ``k`` and ``steps_per_tick`` as ints."""
    _checks.check_choice("mode", mode, _MODES)
    _checks.check_bool("allow_non_monotone", allow_non_monotone)
    if k is None and mode == "paper":
        raise TypeError(
            "k is required in mode='paper' (the tick at which all rates meet), got None"
        )
    k = _checks.check_int("k", k, low=0, optional=True, static=True)
    steps_per_tick = _checks.check_int("steps_per_tick", steps_per_tick, low=1, static=True)
    if mode == "staircase":
        _checks.check_real("c", c, low=1.0, low_open=True)
    else:
        _checks.check_real("c", c, low=0.0, low_open=True)
        if not _checks.is_traced(c) and float(c) == 1.0:
            raise ValueError(f"c must be a finite number > 0 and != 1, got {c!r}")
    _check_unit_interval("decay", decay)
    _check_unit_interval("min_scale", min_scale)
    _check_unit_interval("head_scale", head_scale, optional=True)
    if initial_scales is not None:
        _check_scales(initial_scales, allow_non_monotone)
        _check_staircase_k(mode, k, _concrete(initial_scales), c)
    return k, steps_per_tick


def _check_staircase_k(mode: str, k: int | None, r: np.ndarray | None, c: Any) -> None:
    if mode != "staircase" or k is None or r is None or _concrete(c) is None:
        return
    need = int(np.max(_ticks_needed(r, float(_concrete(c)))))
    if k < need:
        raise ValueError(
            f"k={k!r} is too small for mode='staircase': the smallest initial scale "
            f"{float(np.min(r))!r} needs {need} ticks of x{float(_concrete(c))!r} to reach 1"
        )


def _depth_table(
    param_labels: Any, params: Any, name: str = "param_labels"
) -> dict[str, int | labels_lib.StackedDepth]:
    """``{path: depth}`` for the leaves of ``params``; checks labels are ints >= 0.

    A leaf of a scanned stack may carry a :class:`~optax_multirate.labels.StackedDepth`
    (one depth per slice), whose length must be the leaf's size along its stacked axis.
    """
    by_path = labels_lib.check_labels(param_labels, params, name=name, allow_stacked=True)
    shapes = dict(zip(labels_lib.leaf_paths(params), map(np.shape, jax.tree.leaves(params))))
    out: dict[str, int | labels_lib.StackedDepth] = {}
    for p, lab in by_path.items():
        if isinstance(lab, labels_lib.StackedDepth):
            shape = shapes[p]
            if lab.axis >= len(shape) or shape[lab.axis] != len(lab.depths):
                raise ValueError(
                    f"{name}: the label at {p!r} names {len(lab.depths)} slices on axis "
                    f"{lab.axis}, but the leaf has shape {shape}"
                )
            out[p] = lab
        else:
            out[p] = _checks.check_int(f"{name}: the label at {p!r}", lab, low=0)
    return out


def _depths(label: Any) -> tuple[int, ...]:
    """The depths a label names: one for an int, one per slice for a ``StackedDepth``."""
    if isinstance(label, labels_lib.StackedDepth):
        return label.depths
    return (int(label),) if _checks.is_int(label) else ()


def _all_labels(param_labels: Any, params: Any) -> set[int]:
    """Every depth in the label tree (holes of ``optax.partition`` included)."""
    tree = param_labels(params) if callable(param_labels) else param_labels
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return {d for x in leaves for d in _depths(x)}


def _scaled(x: jax.Array, m: jax.Array, label: int | labels_lib.StackedDepth) -> jax.Array:
    """``x`` times its depth's multiplier; a stacked leaf's slices each by their own."""
    if isinstance(label, int):
        return x * m[label].astype(x.dtype)
    shape = [1] * x.ndim
    shape[label.axis] = len(label.depths)
    return x * m[np.asarray(label.depths)].astype(x.dtype).reshape(shape)


# --------------------------------------------------------------------------- public API


@_checks.renamed_args(depth_labels="param_labels")
def scale_by_lerac(
    param_labels: Any,
    *,
    k: int | None = None,
    initial_scales: Sequence[float] | jax.Array | None = None,
    decay: float | jax.Array = 0.1,
    min_scale: float | jax.Array = 1e-5,
    head_scale: float | jax.Array | None = None,
    mode: str = "paper",
    steps_per_tick: int = 1,
    c: float | jax.Array = 10.0,
    allow_non_monotone: bool = False,
) -> optax.GradientTransformation:
    r"""Scales each leaf's update by its depth's LeRaC multiplier; place it **last**.

    With ``u = count // steps_per_tick`` ticks and initial scales ``r_j`` (1 at the stem,
    non-increasing with depth), the update of a leaf at depth ``j`` is multiplied by

    .. math::

      m_j(u) = r_j^{\,1 - \min(u, k)/k} \quad \text{(paper)}, \qquad
      m_j(u) = \min(1, r_j c^u) \quad \text{(staircase)}.

    In paper mode every unit reaches the base rate at tick ``k`` (``c`` cancels out); in
    staircase mode every rate grows ``c``-fold per tick and unit ``j`` arrives after
    ``ceil(log_c(1/r_j))`` ticks. From then on the multiplier is exactly 1 and the base
    optimizer runs unchanged. Default scales: ``r_j = max(decay**j, min_scale)``, the head
    (last depth) overridden by ``head_scale`` when given (the authors' separate ``clf_lr``).

    Put it after the base optimizer, ``optax.chain(optax.sgd(lr, momentum=0.9),
    scale_by_lerac(...))``: this equals a per-layer rate for any base whose step is linear in
    its rate (sgd with momentum, adam, adamw, lamb, ...). Placed before Adam the factor is
    normalised away. The effective rate is the base schedule times ``m_j``; a base warmup
    multiplies with it (turn it off). Under ``optax.inject_hyperparams`` pass
    ``static_args=("param_labels", "k", "steps_per_tick")``; ``decay``, ``min_scale``,
    ``head_scale`` and ``c`` may then be traced (and are not validated).
    Inside ``optax.MultiSteps`` the count advances once per real update; under
    ``optax.apply_if_finite`` a skipped step does not advance it.

    Args:
      param_labels: a tree shaped like the params with an int depth ``0..n-1`` at each leaf
        (e.g. from :func:`lerac_depth_labels`), or a callable ``params -> tree``. A leaf of a
        scanned stack may carry a :class:`~optax_multirate.labels.StackedDepth` (one depth
        per slice along its stacked axis): each slice then moves at its own depth's rate.
        Every depth must label some leaf (or slice); a shared leaf takes the depth of its
        first use. (Its former name ``depth_labels=`` still works for one release, with a
        ``DeprecationWarning``.)
      k: ticks until every unit reaches the base rate; required in paper mode (0: no
        curriculum), optional in staircase mode (derived; an explicit ``k`` must be at least
        the derived one). Static.
      initial_scales: ``r_0..r_{n-1}`` in (0, 1], non-increasing; overrides the rule below.
      decay: ratio between neighbouring depths in the default rule, in (0, 1].
      min_scale: floor of the default rule, in (0, 1].
      head_scale: initial scale of the last depth (the head), in (0, 1].
      mode: ``"paper"`` or ``"staircase"``.
      steps_per_tick: optimizer steps per tick (e.g. steps per epoch for the authors'
        once-per-epoch staircase). Static.
      c: growth factor per tick in staircase mode (> 1); a no-op in paper mode.
      allow_non_monotone: accept ``initial_scales`` that increase with depth.

    Returns:
      A ``GradientTransformation`` with state :class:`LeracState`.

    Raises:
      TypeError: naming the argument, for a value of the wrong type: ``k`` missing in paper
        mode or not an int (Python or numpy ints are accepted; a traced ``k`` or
        ``steps_per_tick``: pass them in ``static_args``), a string or bool for a number,
        ``initial_scales`` not a sequence of numbers, ``allow_non_monotone`` not a bool; at
        ``init``, a depth label that is not an int.
      ValueError: naming the argument, for ``k`` negative, ``steps_per_tick < 1``, a bad
        ``c``, a scale outside (0, 1] or not finite, increasing ``initial_scales``, ``decay``
        or ``min_scale`` outside (0, 1], an unknown mode, a staircase ``k`` too small; at
        ``init``: unlabelled leaves, negative labels or labels not in ``0..n-1``, an unused
        depth, ``len(initial_scales) != n``, or a ``StackedDepth`` whose number of slices is
        not the leaf's size along its axis.

    Examples:
      The worked example of the spec (4 units, base rate 0.1, ``k = 5``):

      >>> import jax.numpy as jnp, optax
      >>> p = {f"d{j}": jnp.zeros(()) for j in range(4)}
      >>> depth = {f"d{j}": j for j in range(4)}
      >>> tx = optax.chain(optax.sgd(0.1),
      ...                  scale_by_lerac(depth, k=5, initial_scales=(1, 1e-1, 1e-2, 1e-3)))
      >>> s = tx.init(p)
      >>> g = {f"d{j}": jnp.ones(()) for j in range(4)}
      >>> for t in range(6):
      ...     u, s = tx.update(g, s, p)
      ...     print(t, " ".join(f"{-float(u[f'd{j}']):.4g}" for j in range(4)))
      0 0.1 0.01 0.001 0.0001
      1 0.1 0.01585 0.002512 0.0003981
      2 0.1 0.02512 0.00631 0.001585
      3 0.1 0.03981 0.01585 0.00631
      4 0.1 0.0631 0.03981 0.02512
      5 0.1 0.1 0.1 0.1

    References:
      Croitoru et al., `Learning Rate Curriculum <https://arxiv.org/abs/2205.09180>`_, 2024.
    """
    k, steps_per_tick = _validate(
        k=k,
        initial_scales=initial_scales,
        decay=decay,
        min_scale=min_scale,
        head_scale=head_scale,
        mode=mode,
        steps_per_tick=steps_per_tick,
        c=c,
        allow_non_monotone=allow_non_monotone,
    )
    # Label resolution depends only on the tree's structure and shapes: memoised so that an
    # eager (unjitted) loop does not re-check the labels every step.
    resolved: dict[Any, tuple[int | labels_lib.StackedDepth, ...]] = {}

    def leaf_depths(tree: Any, n: int) -> tuple[int | labels_lib.StackedDepth, ...]:
        leaves, treedef = jax.tree.flatten(tree)
        key = (treedef, tuple(np.shape(x) for x in leaves))
        if key not in resolved:
            table = _depth_table(param_labels, tree)
            depths = tuple(table[p] for p in labels_lib.leaf_paths(tree))
            bad = [d for lab in depths for d in _depths(lab) if d >= n]
            if bad:
                raise ValueError(f"param_labels: depth {bad[0]} is outside 0..{n - 1}")
            resolved[key] = depths
        return resolved[key]

    def scales_for(n: int) -> np.ndarray | jax.Array:
        return _resolve_scales(n, initial_scales, decay, min_scale, head_scale)

    def init_fn(params: optax.Params) -> LeracState:
        table = _depth_table(param_labels, params)
        used = _all_labels(param_labels, params) | {d for x in table.values() for d in _depths(x)}
        n_used = max(used, default=-1) + 1
        if initial_scales is not None and len(initial_scales) > n_used:
            raise ValueError(
                f"initial_scales has {len(initial_scales)} entries but param_labels has "
                f"{n_used} depths (0..{n_used - 1}): {tuple(initial_scales)!r}"
            )
        n = len(initial_scales) if initial_scales is not None else n_used
        out = sorted(d for d in used if d >= n)
        if out:
            raise ValueError(
                f"param_labels: depth {out[0]} is outside 0..{n - 1} "
                f"(initial_scales has {n} entries)"
            )
        missing = sorted(set(range(n)) - used)
        if missing:
            raise ValueError(
                f"param_labels: depth {missing[0]} labels no param (depths must be 0..n-1, "
                f"all used; found {sorted(used)})"
            )
        r = scales_for(n)
        rc = _concrete(r)
        if rc is not None:
            if initial_scales is None:
                _check_scales(rc, allow_non_monotone=True)
            _check_staircase_k(mode, k, rc, c)
            if n == 1 and rc[0] < 1:
                logger.warning(
                    "scale_by_lerac: a single depth with initial scale %g < 1 is a plain "
                    "warmup, not a curriculum",
                    rc[0],
                )
        count = jnp.zeros([], jnp.int32)
        return LeracState(count=count, scales=_multipliers(count, r, mode=mode, k=k, c=c))

    def update_fn(
        updates: optax.Updates, state: LeracState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, LeracState]:
        del params
        n = state.scales.shape[0]
        m = _multipliers(state.count // steps_per_tick, scales_for(n), mode=mode, k=k, c=c)
        if not (mode == "paper" and k == 0):  # k = 0: the base optimizer, bit for bit
            depths = leaf_depths(updates, n)
            leaves, treedef = jax.tree.flatten(updates)
            updates = jax.tree.unflatten(
                treedef, [_scaled(x, m, d) for x, d in zip(leaves, depths)]
            )
        return updates, LeracState(count=optax.safe_increment(state.count), scales=m)

    return optax.GradientTransformation(init_fn, update_fn)


@_checks.renamed_args(base_optimizer="inner", depth_labels="param_labels")
def lerac(
    inner: optax.GradientTransformation,
    param_labels: Any,
    *,
    k: int | None = None,
    initial_scales: Sequence[float] | None = None,
    decay: float = 0.1,
    min_scale: float = 1e-5,
    head_scale: float | None = None,
    mode: str = "paper",
    steps_per_tick: int = 1,
    c: float = 10.0,
    allow_non_monotone: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """LeRaC around any optimizer: ``optax.chain(inner, scale_by_lerac(...))``.

    Places the curriculum last, where it scales the final step (see :func:`scale_by_lerac`).
    Extra ``update`` arguments are passed to ``inner``. For PyTorch-style coupled
    weight decay chain it into the base:
    ``lerac(optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)), ...)``.

    Args:
      inner: the optimizer whose steps are scaled (its rate is ``eta^(0)``).
      param_labels: depth label tree, or a callable ``params -> tree``; see
        :func:`lerac_depth_labels`. (The former names ``base_optimizer=`` and
        ``depth_labels=`` still work for one release, with a ``DeprecationWarning``.)
      k: see :func:`scale_by_lerac` (and every other keyword).
      initial_scales: see :func:`scale_by_lerac`.
      decay: see :func:`scale_by_lerac`.
      min_scale: see :func:`scale_by_lerac`.
      head_scale: see :func:`scale_by_lerac`.
      mode: see :func:`scale_by_lerac`.
      steps_per_tick: see :func:`scale_by_lerac`.
      c: see :func:`scale_by_lerac`.
      allow_non_monotone: see :func:`scale_by_lerac`.

    Returns:
      A ``GradientTransformationExtraArgs``; its state is ``(base_state, LeracState)``.

    Raises:
      TypeError: as :func:`scale_by_lerac`, or if ``inner`` is not a
        ``GradientTransformation``.
      ValueError: as :func:`scale_by_lerac`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> p = {"body": jnp.ones(2), "head": jnp.ones(2)}
      >>> tx = lerac(optax.adam(1e-2), {"body": 0, "head": 1}, k=2)
      >>> s = tx.init(p)
      >>> for _ in range(3):
      ...     u, s = tx.update({"body": jnp.ones(2), "head": jnp.ones(2)}, s, p)
      ...     print(f"{-float(u['body'][0]):.4g} {-float(u['head'][0]):.4g}")
      0.01 0.001
      0.01 0.003162
      0.01 0.01
    """
    _checks.check_transformation("inner", inner)
    return optax.chain(
        inner,
        scale_by_lerac(
            param_labels,
            k=k,
            initial_scales=initial_scales,
            decay=decay,
            min_scale=min_scale,
            head_scale=head_scale,
            mode=mode,
            steps_per_tick=steps_per_tick,
            c=c,
            allow_non_monotone=allow_non_monotone,
        ),
    )


def lerac_schedules(
    learning_rate: optax.ScalarOrSchedule,
    num_depths: int | None = None,
    *,
    k: int | None = None,
    initial_scales: Sequence[float] | None = None,
    decay: float = 0.1,
    min_scale: float = 1e-5,
    head_scale: float | None = None,
    mode: str = "paper",
    steps_per_tick: int = 1,
    c: float = 10.0,
    allow_non_monotone: bool = False,
) -> tuple[optax.Schedule, ...]:
    """The LeRaC curriculum as one optax schedule per depth: ``eta_j(t) = eta(t) m_j(t)``.

    For the schedule-injection route: one optimizer per depth under ``optax.partition``, each
    with its schedule as the learning rate (``optax.inject_hyperparams`` or the schedule
    argument of an alias). This equals ``chain(base, scale_by_lerac(...))`` for optimizers
    linear in their rate, but carries ``n`` sub-states; prefer :func:`scale_by_lerac`.

    Args:
      learning_rate: the base rate ``eta^(0)``, a float or an optax schedule.
      num_depths: ``n``; may be omitted when ``initial_scales`` is given.
      k: see :func:`scale_by_lerac` (and every other keyword).
      initial_scales: see :func:`scale_by_lerac`.
      decay: see :func:`scale_by_lerac`.
      min_scale: see :func:`scale_by_lerac`.
      head_scale: see :func:`scale_by_lerac`.
      mode: see :func:`scale_by_lerac`.
      steps_per_tick: see :func:`scale_by_lerac`.
      c: see :func:`scale_by_lerac`.
      allow_non_monotone: see :func:`scale_by_lerac`.

    Returns:
      A tuple of ``n`` schedules ``count -> rate``, indexed by depth.

    Raises:
      TypeError: as :func:`scale_by_lerac`, or for ``num_depths`` missing (without
        ``initial_scales``) or not an int.
      ValueError: as :func:`scale_by_lerac`, or for ``num_depths < 1``.

    Examples:
      >>> import optax
      >>> scheds = lerac_schedules(0.1, 3, k=2)
      >>> print([f"{float(s(1)):.4g}" for s in scheds])
      ['0.1', '0.03162', '0.01']
      >>> tx = optax.partition(
      ...     {j: optax.inject_hyperparams(optax.sgd)(learning_rate=s)
      ...      for j, s in enumerate(scheds)},
      ...     {"a": 0, "b": 1, "c": 2})
    """
    k, steps_per_tick = _validate(
        k=k,
        initial_scales=initial_scales,
        decay=decay,
        min_scale=min_scale,
        head_scale=head_scale,
        mode=mode,
        steps_per_tick=steps_per_tick,
        c=c,
        allow_non_monotone=allow_non_monotone,
    )
    if num_depths is None:
        if initial_scales is None:
            raise TypeError("num_depths is required when initial_scales is not given, got None")
        num_depths = len(initial_scales)
    num_depths = _checks.check_int("num_depths", num_depths, low=1, static=True)
    r = _resolve_scales(num_depths, initial_scales, decay, min_scale, head_scale)
    rc = _concrete(r)
    if rc is not None:
        if initial_scales is None:
            _check_scales(rc, allow_non_monotone=True)
        _check_staircase_k(mode, k, rc, c)
    base = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

    def make(j: int) -> optax.Schedule:
        def schedule(count: jax.typing.ArrayLike) -> jax.Array:
            count = jnp.asarray(count, jnp.int32)
            m = _multipliers(count // steps_per_tick, r, mode=mode, k=k, c=c)
            return base(count) * m[j]

        return schedule

    return tuple(make(j) for j in range(num_depths))


def lerac_depth_labels(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    rngs: Mapping[str, jax.Array] | None = None,
    **kwargs: Any,
) -> Any:
    """LeRaC depth units of a Flax model, in forward order.

    Wraps :func:`optax_multirate.labels.depth_labels` with its default units, the ones the
    authors use for ResNet-18: the stem with its batch norm is depth 0, each residual block
    (its convolutions, batch norms and projection shortcut) is one depth, and the head is the
    last. A plain MLP or CNN gets one depth per layer (a norm layer joins the layer before it).
    Depth follows the order of the forward pass, not names (``ResBlock_10`` comes after
    ``ResBlock_2``). Only ``params`` are labelled; ``batch_stats`` are not touched.

    Args:
      model: a Flax linen module.
      variables: its variables (``{"params": ..., "batch_stats": ...}``) or params alone.
      *args: example inputs of the forward pass (only shapes matter).
      rngs: rngs of the forward pass, if it needs any.
      **kwargs: keyword arguments of the forward pass (e.g. ``train=False``).

    Returns:
      A tree shaped like ``variables["params"]`` holding depths ``0..n-1``.

    Raises:
      ValueError: as :func:`optax_multirate.labels.depth_labels`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_multirate.models import ResNet
      >>> m = ResNet(stage_features=(4, 8), blocks_per_stage=(1, 1), num_classes=3)
      >>> x = jnp.zeros((1, 8, 8, 1))
      >>> v = jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
      >>> d = lerac_depth_labels(m, v, x, train=False)
      >>> print(d["stem"]["kernel"], d["stem_bn"]["scale"], d["ResBlock_0"]["Conv_1"]["kernel"],
      ...       d["ResBlock_1"]["proj_bn"]["bias"], d["head"]["kernel"])
      0 0 1 2 3
    """
    return labels_lib.depth_labels(
        model, variables, *args, unit_level=1, merge_norm=True, rngs=rngs, **kwargs
    )
