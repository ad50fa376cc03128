"""Weight update skipping (WUS, WUS+LR), driven by an in-graph plateau monitor.

When the epoch-to-epoch change of the accuracy becomes tiny, WUS opens a *window* of a few
epochs in which the weights (and their optimizer state) are held while the biases keep
training. With the phase protocol (:mod:`optax_multirate.phases`) the train step then
differentiates only the leaves that keep training, so a window step skips every
weight-gradient product. WUS+LR also decays a learning-rate scale each time a window opens.

The rules the paper leaves open are the library's choices: the signal is a metric averaged
over each decision period, a period is flat when it moves less than ``threshold`` from the
previous one, a window lasts ``window`` periods and none opens during ``warmup``, and "+LR"
decays every update at each window opening. The docs page (``docs/wus.md``, "Our choices where
the paper is silent") gives the reasons.

References:
  Safayenikoo and Akturk, `Weight Update Skipping: Reducing Training Time for Artificial
  Neural Networks <https://arxiv.org/abs/2012.02792>`_, 2020; IEEE JETCAS 11(4), 2021.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_multirate import _checks
from optax_multirate import labels as labels_lib
from optax_multirate.phases import PhaseTag, phase_tag, set_phase

__all__ = ["WusState", "wus", "wus_labels", "wus_phase"]

_HOLD, _KEEP = "hold", "keep"


class WusState(NamedTuple):
    """State of :func:`wus`.

    Attributes:
      inner_state: ``optax.partition`` state of two instances of the inner optimizer:
        ``inner_states["hold"]`` (leaves held in a window; its state is held too) and
        ``inner_states["keep"]`` (leaves trained in a window).
      count: int32 scalar, ``update`` calls so far in the current decision period.
      value_sum: float32 scalar, sum of ``value`` over the current period.
      prev_value: float32 scalar, the last period's mean value (NaN before the first).
      periods: int32 scalar, completed decision periods.
      flat_count: int32 scalar, consecutive flat periods (outside windows).
      skip_left: int32 scalar, periods left in the open window (0: no window).
      windows: int32 scalar, windows opened so far.
      lr_scale: float32 scalar, WUS+LR's scale of every update (1.0 for WUS).
      steps: int32 scalar, ``update`` calls so far.
      skipped_steps: int32 scalar, ``update`` calls made inside a window.
      tag: the :class:`~optax_multirate.phases.PhaseTag`; phase 1 (bias-only) while
        ``skip_left > 0``, else 0.
    """

    inner_state: optax.OptState
    count: jax.Array
    value_sum: jax.Array
    prev_value: jax.Array
    periods: jax.Array
    flat_count: jax.Array
    skip_left: jax.Array
    windows: jax.Array
    lr_scale: jax.Array
    steps: jax.Array
    skipped_steps: jax.Array
    tag: PhaseTag


def wus_labels(params: Any, *, norm_scale: str = "weight") -> Any:
    """Labels each param leaf ``"weight"`` (held in a window) or ``"bias"`` (trained).

    Leaves named ``bias`` (dense, conv and normalization offsets) are biases; normalization
    ``scale`` leaves are ``norm_scale``; kernels and embeddings are weights.

    Args:
      params: the parameter tree.
      norm_scale: ``"weight"`` (default: a batch-norm scale is held, as PyTorch's
        ``bn.weight``) or ``"bias"`` (it trains in windows; it is as cheap as a bias).

    Returns:
      A label tree with the structure of ``params``.

    Raises:
      ValueError: if ``norm_scale`` is not ``"weight"`` or ``"bias"``.

    Examples:
      >>> wus_labels({"Conv_0": {"kernel": 0, "bias": 0}, "BatchNorm_0": {"scale": 0}})
      {'BatchNorm_0': {'scale': 'weight'}, 'Conv_0': {'bias': 'bias', 'kernel': 'weight'}}
    """
    return labels_lib.weight_bias_labels(params, norm_scale=norm_scale)


@_checks.renamed_args(state="opt_state")
def wus_phase(opt_state: optax.OptState) -> jax.Array:
    """The phase of the next step of the :func:`wus` in ``opt_state``: 0 full, 1 bias-only.

    Args:
      opt_state: a :class:`WusState`, or any optimizer state holding exactly one (the former
        name ``state=`` still works for one release, with a ``DeprecationWarning``).

    Returns:
      An int32 scalar array.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`WusState` or more than one.
    """
    return _checks.find_state("opt_state", opt_state, WusState).tag.phase


@_checks.renamed_args(labels="param_labels")
def wus(
    inner: optax.GradientTransformation,
    param_labels: Any,
    threshold: float | jax.Array = 0.005,
    window: int = 2,
    accumulation_size: int = 1,
    lr_factor: float | jax.Array | None = None,
    *,
    patience: int = 1,
    warmup: int = 3,
    min_lr_scale: float | jax.Array = 0.0,
    max_windows: int | None = None,
    keep: Hashable | Collection[Hashable] = "bias",
    force_windows: Sequence[int] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Weight update skipping: holds the weights while a monitored metric is flat.

    Each ``update`` takes a scalar ``value`` (e.g. the minibatch training accuracy);
    ``accumulation_size`` consecutive values are averaged into one decision value :math:`v_k`
    (with ``accumulation_size = steps_per_epoch``, one per epoch). Outside a window, period
    :math:`k` is flat when :math:`|v_k - v_{k-1}| < \text{threshold}` (the first period, and
    any non-finite :math:`v_k` or difference, is never flat). After ``patience`` consecutive
    flat periods, once ``k >= warmup`` and while fewer than ``max_windows`` windows have
    opened, a window of ``window`` periods opens from the next step. In a window the leaves
    whose label is not in ``keep`` get zero updates and their optimizer state is held (no
    momentum, moment or count change, no decoupled weight decay); the ``keep`` leaves (biases
    by default) train normally. No flatness is judged in a window; its last period's value is
    the reference of the next judgement, so at least one full period separates two windows.

    WUS+LR (``lr_factor`` set): every update is multiplied by ``lr_scale``, which starts at 1
    and becomes :math:`\max(\text{lr\_scale} \cdot \text{lr\_factor}, \text{min\_lr\_scale})`
    each time a window opens.

    ``inner`` runs as two independent instances, one over the held leaves and one over the
    ``keep`` leaves (``optax.partition``): SGD, momentum and Adam equal one instance over all
    leaves, but a global-norm clip inside ``inner`` clips per group (clip before ``wus``
    instead, knowing that in a window it sees zero weight gradients under the phased step).

    Phases (:mod:`optax_multirate.phases`): 0 reads every label, 1 (in a window) reads only
    ``keep``; a :class:`~optax_multirate.phases.PhasedStep` then differentiates only the
    ``keep`` leaves during windows. The phase gating an ``update`` is the incoming state's.

    Under ``optax.inject_hyperparams``, ``threshold``, ``lr_factor`` and ``min_lr_scale`` may
    be injected; ``window``, ``accumulation_size``, ``patience``, ``warmup`` and
    ``max_windows`` shape the decisions and must be in ``static_args``.

    Args:
      inner: the optimizer to wrap (any optax transformation).
      param_labels: label tree (or callable ``params -> tree``) matching the params, e.g.
        :func:`wus_labels`. Each leaf is ``"weight"``, ``"bias"`` or a label in ``keep``.
        (Its former name ``labels=`` still works for one release, with a
        ``DeprecationWarning``.)
      threshold: a period is flat when ``value``'s mean changed by less than this (units of
        ``value``); ``0`` disables the monitor.
      window: window length in decision periods.
      accumulation_size: ``update`` calls averaged into one decision period.
      lr_factor: None for WUS; for WUS+LR, the decay in (0, 1) of ``lr_scale`` per window.
      patience: consecutive flat periods needed to open a window.
      warmup: completed periods before any window may open.
      min_lr_scale: floor of ``lr_scale``, in [0, 1].
      max_windows: cap on windows opened by the monitor; None for no cap.
      keep: the label, or labels, whose leaves keep training in a window.
      force_windows: periods ``p >= 1`` at whose end a window opens whatever the monitor
        says (the monitor's rules and ``max_windows`` do not apply; a ``p`` inside an open
        window is ignored). With ``threshold=0`` only these open: a hand-made schedule. With
        ``force_windows`` given, ``value`` may be omitted.

    Returns:
      A ``GradientTransformationExtraArgs``. ``update(updates, state, params, *, value,
      **extra)``: ``value`` is a scalar (under data parallelism, the all-replica mean);
      ``value`` and the other extra args are passed on to ``inner``.

    Raises:
      TypeError: for an argument of the wrong type (naming it): ``inner`` not an optax
        transformation, a float or bool for an int (ints may be Python or numpy ints; a traced
        one: pass it in ``static_args``), a string for a number, ``force_windows`` not a
        sequence of ints. In ``update``, for a missing or non-scalar ``value``.
      ValueError: for an argument outside the ranges above (naming it); at ``init``, for
        labels that do not match the params or are not allowed, no leaf labelled ``keep``
        (nothing would train in a window) or no other leaf (nothing to skip).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> p = {"w": jnp.ones(2), "bias": jnp.ones(2)}
      >>> tx = wus(optax.sgd(1.0), {"w": "weight", "bias": "bias"}, warmup=1, window=1)
      >>> s = tx.init(p)
      >>> g = {"w": jnp.ones(2), "bias": jnp.ones(2)}
      >>> for acc in [0.5, 0.8, 0.801, 0.9]:
      ...     u, s = tx.update(g, s, p, value=acc)
      ...     print(f"{float(u['w'][0])} {float(u['bias'][0])} phase={int(wus_phase(s))}")
      -1.0 -1.0 phase=0
      -1.0 -1.0 phase=0
      -1.0 -1.0 phase=1
      0.0 -1.0 phase=0

    References:
      Safayenikoo and Akturk, `Weight Update Skipping: Reducing Training Time for Artificial
      Neural Networks <https://arxiv.org/abs/2012.02792>`_, 2020.
    """
    _checks.check_transformation("inner", inner)
    _checks.check_real("threshold", threshold, low=0.0)
    window = _checks.check_int("window", window, low=1, static=True)
    accumulation_size = _checks.check_int(
        "accumulation_size", accumulation_size, low=1, static=True
    )
    patience = _checks.check_int("patience", patience, low=1, static=True)
    warmup = _checks.check_int("warmup", warmup, low=0, static=True)
    max_windows = _checks.check_int("max_windows", max_windows, low=0, optional=True, static=True)
    _checks.check_real(
        "lr_factor", lr_factor, low=0.0, high=1.0, low_open=True, high_open=True, optional=True
    )
    _checks.check_real("min_lr_scale", min_lr_scale, low=0.0, high=1.0)
    if isinstance(keep, str) or not isinstance(keep, Collection):
        keep = (keep,)
    keep_set = frozenset(keep)
    if not keep_set:
        raise ValueError(f"keep must name at least one label, got {keep!r}")
    if force_windows is not None:
        force_windows = _checks.check_int_sequence("force_windows", force_windows, low=1)
        if len(set(force_windows)) != len(force_windows):
            raise ValueError(f"force_windows must not repeat a period, got {force_windows!r}")
    allowed = {"weight", "bias"} | keep_set
    inner = optax.with_extra_args_support(inner)

    def split(weights_active: jax.Array | bool, groups: Any) -> optax.GradientTransformation:
        return optax.partition({_HOLD: _hold_unless(inner, weights_active), _KEEP: inner}, groups)

    def groups_of(params: Any) -> tuple[Any, dict[str, Hashable]]:
        by_path = labels_lib.check_labels(
            param_labels, params, allowed=allowed, name="param_labels"
        )
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        groups = [_KEEP if by_path[labels_lib.path_str(p)] in keep_set else _HOLD for p, _ in flat]
        return jax.tree_util.tree_unflatten(treedef, groups), by_path

    def init_fn(params: optax.Params) -> WusState:
        groups, by_path = groups_of(params)
        found = set(by_path.values())
        if not found & keep_set:
            raise ValueError(
                f"wus: no param is labelled {sorted(map(str, keep_set))} (keep={keep!r}; "
                f"labels found: {sorted(map(str, found))}), so nothing would train in a "
                "window. Give the model biases (use_bias=True), pass norm_scale='bias' to "
                "wus_labels so normalization scales train in windows, or choose the leaves "
                "that keep training with keep="
            )
        if not found - keep_set:
            raise ValueError(
                f"wus: every param is labelled in keep={keep!r}: nothing would be skipped; "
                "label the weights 'weight'"
            )
        tag = phase_tag(params, param_labels, {0: found, 1: found & keep_set}, name="wus")
        i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return WusState(
            inner_state=split(True, groups).init(params),
            count=i32(0),
            value_sum=f32(0.0),
            prev_value=f32(math.nan),
            periods=i32(0),
            flat_count=i32(0),
            skip_left=i32(0),
            windows=i32(0),
            lr_scale=f32(1.0),
            steps=i32(0),
            skipped_steps=i32(0),
            tag=tag,
        )

    def update_fn(
        updates: optax.Updates,
        state: WusState,
        params: optax.Params | None = None,
        *,
        value: jax.typing.ArrayLike | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, WusState]:
        if value is None:
            if force_windows is None:
                raise TypeError(
                    "wus: update needs the keyword argument value= (a scalar metric such as "
                    "the minibatch accuracy; with the train step: extra_args_fn=lambda m: "
                    "{'value': m['accuracy']})"
                )
            v_in = jnp.asarray(math.nan, jnp.float32)
        else:
            v_in = jnp.asarray(_checks.check_scalar("value", value), jnp.float32)
            extra = dict(extra, value=value)
        in_window = state.tag.phase > 0
        groups, _ = groups_of(updates)
        updates, inner_state = split(jnp.logical_not(in_window), groups).update(
            updates, state.inner_state, params, **extra
        )
        if lr_factor is not None:
            updates = jax.tree.map(lambda u: (u * state.lr_scale).astype(u.dtype), updates)
        mon = _monitor(state, v_in, in_window)
        return updates, state._replace(inner_state=inner_state, **mon)

    def _monitor(state: WusState, v_in: jax.Array, in_window: jax.Array) -> dict[str, Any]:
        count = optax.safe_increment(state.count)
        value_sum = state.value_sum + v_in
        end = count >= accumulation_size
        v = value_sum / accumulation_size
        periods = jnp.where(end, optax.safe_increment(state.periods), state.periods)
        delta = v - state.prev_value
        flat = jnp.isfinite(delta) & (jnp.abs(delta) < threshold)
        flat_count = jnp.where(flat, optax.safe_increment(state.flat_count), 0)
        want = (flat_count >= patience) & (periods >= warmup)
        if max_windows is not None:
            want &= state.windows < max_windows
        if force_windows:
            want |= jnp.isin(periods, jnp.asarray(force_windows, jnp.int32))
        judge = end & (state.skip_left == 0)
        opens = judge & want
        skip_left = jnp.where(
            opens,
            window,
            jnp.where(end & (state.skip_left > 0), state.skip_left - 1, state.skip_left),
        ).astype(jnp.int32)
        lr_scale = state.lr_scale
        if lr_factor is not None:
            decayed = jnp.maximum(lr_scale * lr_factor, min_lr_scale).astype(jnp.float32)
            lr_scale = jnp.where(opens, decayed, lr_scale)
        return dict(
            count=jnp.where(end, 0, count).astype(jnp.int32),
            value_sum=jnp.where(end, 0.0, value_sum).astype(jnp.float32),
            prev_value=jnp.where(end, v, state.prev_value).astype(jnp.float32),
            periods=periods,
            flat_count=jnp.where(judge, jnp.where(opens, 0, flat_count), state.flat_count).astype(
                jnp.int32
            ),
            skip_left=skip_left,
            windows=jnp.where(opens, optax.safe_increment(state.windows), state.windows),
            lr_scale=lr_scale,
            steps=optax.safe_increment(state.steps),
            skipped_steps=jnp.where(
                in_window, optax.safe_increment(state.skipped_steps), state.skipped_steps
            ),
            tag=set_phase(state.tag, skip_left > 0),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _hold_unless(
    inner: optax.GradientTransformationExtraArgs, active: jax.Array | bool
) -> optax.GradientTransformationExtraArgs:
    """``inner`` where ``active``; else zero updates and ``inner``'s state unchanged.

    The gate selects with ``jnp.where`` (a NaN in the discarded branch changes nothing)
    rather than ``lax.cond``: on XLA CPU a ``cond`` around the optimizer's arithmetic made a
    full step of the benchmark's CNN 17-26% slower, the select costs nothing measurable.
    """

    def update_fn(updates, state, params=None, **extra):
        new_updates, new_state = inner.update(updates, state, params, **extra)
        updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_state, state)
        return updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
