"""Two regimes: a large-step phase, then a small-step phase with its own optimizer.

SGD training passes through two regimes: with a large step it optimizes poorly but decides
generalization; with a small step it optimizes fast and convex-like. :func:`two_regimes` runs
a dedicated optimizer in each regime and switches once, in-graph, from the first to the second:

.. math::

    u_t = \\begin{cases} A(g_t) & t < t^\\star \\\\ B(g_t) & t \\ge t^\\star \\end{cases},
    \\qquad t^\\star = \\min\\{t : \\text{step} \\lor \\text{plateau} \\lor \\text{signal}\\}

where ``A`` is the large-step optimizer, ``B`` the small-step one (with its own state, fresh at
the switch) and the switch ``t*`` is latched for good. The switch is triggered by a step count,
a plateau of the ``value=`` signal (the windowing and comparison of
``optax.contrib.reduce_on_plateau``), or an external ``switch=`` signal. One compiled step serves
the whole run; :func:`phase_of` and ``state.switched_at`` tell a loop where it stands.
:func:`two_regimes_sgd` is the one-knob preset: constant-rate SGD, then Adam.

The rules the paper leaves open are the library's choices: the preset runs constant-rate SGD
without momentum, then ``adam(1e-3)``, switching at 0.8 of the budget, with the same coupled
weight decay in both phases; the phase-1 state is re-initialised at the switch. The docs page
(``docs/two_regimes.md``, "Our choices where the paper is silent") gives the reasons.

Phase protocol: two regimes reads every gradient in both phases (it saves tuning runs, not
backward work). Its state still carries a :class:`~optax_multirate.phases.PhaseTag` declaring
both phases as reading every leaf, so :class:`~optax_multirate.phases.PhasedStep` and the test
battery treat it like every phased method; ``tag.phase`` mirrors ``state.phase``.

References:
  Leclerc and Madry, `The Two Regimes of Deep Network Training
  <https://arxiv.org/abs/2002.10376>`_, 2020.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_multirate import _checks
from optax_multirate.phases import PhaseTag, phase_tag, set_phase

__all__ = [
    "PlateauTrigger",
    "TwoRegimesPlateauState",
    "TwoRegimesState",
    "phase_of",
    "two_regimes",
    "two_regimes_sgd",
]

_ALL = "all"


@dataclasses.dataclass(frozen=True)
class PlateauTrigger:
    """The plateau trigger of :func:`two_regimes`: switch when ``value`` stops improving.

    ``value`` (e.g. the training loss of each step) is averaged over windows of
    ``accumulation_size`` calls. A window mean ``m`` improves if ``m < (1 - rtol) * best - atol``
    (``best`` starts at +inf; a NaN never improves), as in ``optax.contrib.reduce_on_plateau``.
    The switch fires at the first call with ``bad_windows >= patience`` and
    ``count >= min_large_steps``, or with ``count >= max_large_steps``.

    Attributes:
      patience: windows without improvement before the switch (>= 1).
      accumulation_size: calls per window (>= 1); steps per epoch gives one window per epoch.
      rtol: relative tolerance in [0, 1].
      atol: absolute tolerance >= 0 (``rtol`` and ``atol`` are not both 0).
      min_large_steps: earliest call count at which the plateau may switch; None means
        ``patience * accumulation_size`` (capped at ``max_large_steps``).
      max_large_steps: switch at this call count at the latest; None means no cap.

    Raises:
      TypeError: naming the attribute, for a value of the wrong type (a float or bool for an
        int; Python and numpy ints are accepted).
      ValueError: naming the attribute, for a value outside the ranges above or
        ``max_large_steps < min_large_steps``.

    Examples:
      >>> PlateauTrigger(patience=2, accumulation_size=10).min_steps
      20
    """

    patience: int = 5
    accumulation_size: int = 1
    rtol: float = 1e-3
    atol: float = 0.0
    min_large_steps: int | None = None
    max_large_steps: int | None = None

    def __post_init__(self) -> None:
        ints = {
            "patience": _checks.check_int("patience", self.patience, low=1),
            "accumulation_size": _checks.check_int(
                "accumulation_size", self.accumulation_size, low=1
            ),
            "min_large_steps": _checks.check_int(
                "min_large_steps", self.min_large_steps, low=0, optional=True
            ),
            "max_large_steps": _checks.check_int(
                "max_large_steps", self.max_large_steps, low=0, optional=True
            ),
        }
        for name, v in ints.items():  # numpy ints become Python ints (hashing, printing)
            object.__setattr__(self, name, v)
        _checks.check_real("rtol", self.rtol, low=0.0, high=1.0)
        _checks.check_real("atol", self.atol, low=0.0)
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("rtol and atol must not both be 0, got rtol=0 and atol=0")
        lo, hi = self.min_large_steps, self.max_large_steps
        if lo is not None and hi is not None and hi < lo:
            raise ValueError(f"max_large_steps must be >= min_large_steps ({lo}), got {hi!r}")

    @property
    def min_steps(self) -> int:
        """``min_large_steps``, resolved (``patience * accumulation_size`` when None)."""
        if self.min_large_steps is not None:
            return self.min_large_steps
        default = self.patience * self.accumulation_size
        return default if self.max_large_steps is None else min(default, self.max_large_steps)


class TwoRegimesPlateauState(NamedTuple):
    """State of the plateau trigger (frozen once phase 1 starts).

    Attributes:
      best: float32 scalar, best window mean so far (+inf before the first window).
      bad_windows: int32 scalar, windows since the last improvement.
      acc_sum: float32 scalar, sum of ``value`` over the current window.
      acc_n: int32 scalar, calls in the current window.
    """

    best: jax.Array
    bad_windows: jax.Array
    acc_sum: jax.Array
    acc_n: jax.Array


class TwoRegimesState(NamedTuple):
    """State of :func:`two_regimes`. Its pytree structure never changes during training.

    Attributes:
      count: int32 scalar, ``update`` calls so far.
      phase: int32 scalar, 0 (large step) or 1 (small step): the phase of the last call, latched.
      switched_at: int32 scalar, ``count`` of the first phase-1 call (-1 before the switch).
      large_state: state of the large-step optimizer (frozen after the switch).
      small_state: state of the small-step optimizer (as ``init`` made it before the switch).
      plateau_state: a :class:`TwoRegimesPlateauState` with ``plateau=``, else None.
      tag: the :class:`~optax_multirate.phases.PhaseTag` (both phases read every leaf;
        ``tag.phase == phase``).
    """

    count: jax.Array
    phase: jax.Array
    switched_at: jax.Array
    large_state: optax.OptState
    small_state: optax.OptState
    plateau_state: TwoRegimesPlateauState | None
    tag: PhaseTag


def _all_labels(params: Any) -> Any:
    return jax.tree.map(lambda _: _ALL, params)


def _plateau_step(
    trig: PlateauTrigger,
    ps: TwoRegimesPlateauState,
    value: jax.typing.ArrayLike,
    count: jax.Array,
    in_large: jax.Array,
) -> tuple[TwoRegimesPlateauState, jax.Array]:
    """One call of the plateau rules; returns the new state and ``by_plateau``."""
    acc_sum = ps.acc_sum + jnp.where(in_large, jnp.asarray(value).astype(jnp.float32), 0.0)
    acc_n = ps.acc_n + in_large.astype(jnp.int32)
    full = in_large & (acc_n == trig.accumulation_size)
    m = acc_sum / jnp.maximum(acc_n, 1).astype(jnp.float32)
    threshold = jnp.where(jnp.isinf(ps.best), jnp.inf, (1.0 - trig.rtol) * ps.best - trig.atol)
    improved = m < threshold  # False for NaN
    best = jnp.where(full & improved, m, ps.best)
    bad = jnp.where(
        full, jnp.where(improved, 0, optax.safe_increment(ps.bad_windows)), ps.bad_windows
    )
    new = TwoRegimesPlateauState(
        best=best,
        bad_windows=bad.astype(jnp.int32),
        acc_sum=jnp.where(full, 0.0, acc_sum),
        acc_n=jnp.where(full, 0, acc_n).astype(jnp.int32),
    )
    fire = (bad >= trig.patience) & (count >= trig.min_steps)
    if trig.max_large_steps is not None:
        fire = fire | (count >= trig.max_large_steps)
    return new, fire


def _check_branches(large, small, updates, state, params, fwd) -> None:
    """Raises a ValueError naming both optimizers if their updates differ in structure."""

    def out(tx, s):
        return jax.eval_shape(lambda: tx.update(updates, s, params, **fwd)[0])

    a, b = out(large, state.large_state), out(small, state.small_state)
    sa = [(x.shape, x.dtype) for x in jax.tree.leaves(a)]
    sb = [(x.shape, x.dtype) for x in jax.tree.leaves(b)]
    if jax.tree.structure(a) != jax.tree.structure(b) or sa != sb:
        raise ValueError(
            "large_tx and small_tx must return updates of the same structure, shapes and "
            f"dtypes; large_tx gives {jax.tree.structure(a)} {sa[:3]}..., small_tx gives "
            f"{jax.tree.structure(b)} {sb[:3]}..."
        )


@_checks.renamed_args(large_step="large_tx", small_step="small_tx")
def two_regimes(
    large_tx: optax.GradientTransformation,
    small_tx: optax.GradientTransformation,
    *,
    switch_step: int | jax.Array | None = None,
    plateau: PlateauTrigger | None = None,
    signal: bool = False,
    reinit_small_at_switch: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``large_tx`` until a trigger fires, then ``small_tx`` for good.

    Call ``k`` (``count = k`` calls before it) runs ``small_tx`` if any trigger fired at a call
    ``<= k``: ``count >= switch_step``; the plateau rules of ``plateau`` on ``value``; or a true
    ``switch``. So with ``switch_step=S`` calls ``0..S-1`` are phase 0 and call ``S`` on is phase 1
    (the ``step < boundary`` rule of ``optax.join_schedules``); ``switch_step=0`` is phase 1 from
    the first call. ``small_tx``'s own count starts at 0 on its first update, so its schedules
    run from the switch. At the switch ``small_tx.init(params)`` is called again with the
    current params if ``reinit_small_at_switch`` (a no-op for sgd/adam; it matters for states
    that copy the params, e.g. schedule-free or parameter EMA). Phase 0's state is not carried
    over. Every extra keyword argument of ``update`` (``value`` and ``switch`` included) is
    passed to both optimizers, as ``optax.chain`` does.

    Under ``vmap`` with a batched state both optimizers run and each batch member switches on
    its own. Under ``optax.MultiSteps`` the count is in optimizer updates; under
    ``optax.apply_if_finite`` rejected steps do not count. ``switch_step`` may be injected
    (``inject_hyperparams``); ``plateau`` and ``signal`` are structural. The former names
    ``large_step=`` and ``small_step=`` still work for one release, with a
    ``DeprecationWarning``.

    Args:
      large_tx: the phase-0 optimizer (e.g. ``optax.sgd(0.1)``).
      small_tx: the phase-1 optimizer (e.g. ``optax.adam(1e-3)``); its updates must have the
        structure, shapes and dtypes of ``large_tx``'s.
      switch_step: switch at this call count (int >= 0), or None.
      plateau: a :class:`PlateauTrigger` on ``value=``, or None.
      signal: accept a boolean ``switch=`` extra argument (required on every call when True).
      reinit_small_at_switch: call ``small_tx.init(params)`` at the switch.

    Returns:
      A ``GradientTransformationExtraArgs`` whose ``update(updates, state, params=None, *,
      value=None, switch=None, **extra)`` returns ``(updates, TwoRegimesState)``.

    Raises:
      TypeError: if ``large_tx`` or ``small_tx`` is not an ``optax.GradientTransformation``,
        ``plateau`` is not a :class:`PlateauTrigger`, ``switch_step`` is not an int (Python or
        numpy; bools rejected), or ``signal`` or ``reinit_small_at_switch`` is not a bool; at
        trace time in ``update``: ``value`` missing (with ``plateau``) or not a scalar,
        ``switch`` missing (``signal=True``), passed (``signal=False``) or not a scalar.
      ValueError: if no trigger is given or ``switch_step < 0``; at trace time in ``update``:
        ``params`` None with re-init on (as optax's transformations that need params), or the
        two optimizers' updates differing in structure or dtype.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = two_regimes(optax.sgd(1.0), optax.sgd(0.1), switch_step=2)
      >>> p = {"w": jnp.zeros(())}
      >>> s = tx.init(p)
      >>> for _ in range(3):
      ...     u, s = tx.update({"w": jnp.ones(())}, s, p)
      ...     print(f"{float(u['w']):.1f} phase={int(s.phase)} switched_at={int(s.switched_at)}")
      -1.0 phase=0 switched_at=-1
      -1.0 phase=0 switched_at=-1
      -0.1 phase=1 switched_at=2

    References:
      Leclerc and Madry, `The Two Regimes of Deep Network Training
      <https://arxiv.org/abs/2002.10376>`_, 2020.
    """
    _checks.check_transformation("large_tx", large_tx)
    _checks.check_transformation("small_tx", small_tx)
    _checks.check_instance("plateau", plateau, PlateauTrigger, optional=True)
    signal = _checks.check_bool("signal", signal)
    reinit_small_at_switch = _checks.check_bool("reinit_small_at_switch", reinit_small_at_switch)
    switch_step = _checks.check_int("switch_step", switch_step, low=0, optional=True)
    if switch_step is None and plateau is None and not signal:
        raise ValueError(
            "two_regimes needs a trigger: switch_step, plateau or signal=True; got "
            "switch_step=None, plateau=None, signal=False"
        )
    large = optax.with_extra_args_support(large_tx)
    small = optax.with_extra_args_support(small_tx)

    def init_fn(params: optax.Params) -> TwoRegimesState:
        plateau_state = None
        if plateau is not None:
            plateau_state = TwoRegimesPlateauState(
                best=jnp.asarray(jnp.inf, jnp.float32),
                bad_windows=jnp.zeros([], jnp.int32),
                acc_sum=jnp.zeros([], jnp.float32),
                acc_n=jnp.zeros([], jnp.int32),
            )
        tag = phase_tag(params, _all_labels, {0: {_ALL}, 1: {_ALL}}, name="two_regimes")
        return TwoRegimesState(
            count=jnp.zeros([], jnp.int32),
            phase=jnp.zeros([], jnp.int32),
            switched_at=jnp.full([], -1, jnp.int32),
            large_state=large.init(params),
            small_state=small.init(params),
            plateau_state=plateau_state,
            tag=tag,
        )

    def update_fn(
        updates: optax.Updates,
        state: TwoRegimesState,
        params: optax.Params | None = None,
        *,
        value: jax.typing.ArrayLike | None = None,
        switch: jax.typing.ArrayLike | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, TwoRegimesState]:
        if plateau is not None and value is None:
            raise TypeError("value= is required by the plateau trigger (plateau is set)")
        if value is not None:
            _checks.check_scalar("value", value)
        if signal and switch is None:
            raise TypeError("switch= is required on every call with signal=True")
        if switch is not None and not signal:
            raise TypeError("switch= was passed but signal=False: build with signal=True")
        if switch is not None:
            _checks.check_scalar("switch", switch)
        if reinit_small_at_switch and params is None:
            raise ValueError(
                "params are required by reinit_small_at_switch=True: pass params to update"
            )
        fwd = dict(extra)
        if value is not None:
            fwd["value"] = value
        if switch is not None:
            fwd["switch"] = switch
        _check_branches(large, small, updates, state, params, fwd)

        in_large = state.phase == 0
        go_small = state.phase == 1
        if switch_step is not None:
            go_small = go_small | (state.count >= switch_step)
        plateau_state = state.plateau_state
        if plateau is not None:
            plateau_state, by_plateau = _plateau_step(
                plateau, plateau_state, value, state.count, in_large
            )
            go_small = go_small | by_plateau
        if signal:
            go_small = go_small | jnp.asarray(switch).astype(bool)
        just = go_small & in_large

        small_state = state.small_state
        if reinit_small_at_switch:
            small_state = jax.lax.cond(just, lambda: small.init(params), lambda: small_state)

        def run_large():
            u, large_state = large.update(updates, state.large_state, params, **fwd)
            return u, large_state, small_state

        def run_small():
            u, new_small = small.update(updates, small_state, params, **fwd)
            return u, state.large_state, new_small

        out, large_state, small_state = jax.lax.cond(go_small, run_small, run_large)
        phase = go_small.astype(jnp.int32)
        return out, TwoRegimesState(
            count=optax.safe_increment(state.count),
            phase=phase,
            switched_at=jnp.where(just, state.count, state.switched_at).astype(jnp.int32),
            large_state=large_state,
            small_state=small_state,
            plateau_state=plateau_state,
            tag=set_phase(state.tag, phase),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@_checks.renamed_args(lr_large="learning_rate", small_step="small_tx")
def two_regimes_sgd(
    learning_rate: float | jax.Array,
    *,
    total_steps: int,
    large_fraction: float = 0.8,
    small_tx: optax.GradientTransformation | None = None,
    weight_decay: float | jax.Array = 0.0,
    reinit_small_at_switch: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """The one-knob preset: constant-rate SGD for a fraction of the budget, then Adam.

    Phase 0 is ``chain(add_decayed_weights(weight_decay), sgd(learning_rate))`` (no momentum:
    in the large-step regime momentum only rescales the rate; with momentum ``mu`` pass
    ``learning_rate * (1 - mu)``). Phase 1 is ``chain(add_decayed_weights(weight_decay),
    small_tx)`` with ``small_tx`` defaulting to ``optax.adam(1e-3)``, left untuned. The switch
    is at ``switch_step = round(large_fraction * total_steps)`` updates. The same coupled L2 in
    both phases keeps one objective.

    ``learning_rate`` and ``weight_decay`` may be traced (``inject_hyperparams``, ``vmap`` over
    configurations); ``total_steps`` and ``large_fraction`` are structural: pass them as
    ``static_args`` to ``inject_hyperparams``. The former names ``lr_large=`` and
    ``small_step=`` still work for one release, with a ``DeprecationWarning``.

    Args:
      learning_rate: the constant phase-0 SGD rate, finite and > 0: the one knob to tune.
      total_steps: the training budget in optimizer updates (int >= 1).
      large_fraction: fraction of the budget in phase 0, in (0, 1]; 1 never switches (warns).
      small_tx: the phase-1 optimizer; None means ``optax.adam(1e-3)``.
      weight_decay: coupled L2 coefficient >= 0, added in both phases.
      reinit_small_at_switch: see :func:`two_regimes`.

    Returns:
      A :func:`two_regimes` transformation.

    Raises:
      TypeError: naming the argument, for a value of the wrong type: a string or bool for a
        number, ``total_steps`` not an int (Python or numpy), ``total_steps`` or
        ``large_fraction`` traced (pass them in ``static_args``), or ``small_tx`` neither
        None nor an ``optax.GradientTransformation``.
      ValueError: naming the argument, for ``learning_rate`` not finite and > 0,
        ``total_steps < 1``, ``large_fraction`` outside (0, 1], or ``weight_decay`` < 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = two_regimes_sgd(0.1, total_steps=10, large_fraction=0.5)
      >>> p = {"w": jnp.zeros(2)}
      >>> s = tx.init(p)
      >>> for _ in range(10):
      ...     _, s = tx.update({"w": jnp.ones(2)}, s, p)
      >>> print(int(phase_of(s)), int(s.switched_at))
      1 5
    """
    _checks.check_real("learning_rate", learning_rate, low=0.0, low_open=True)
    total_steps = _checks.check_int("total_steps", total_steps, low=1, static=True)
    _checks.check_real(
        "large_fraction", large_fraction, low=0.0, high=1.0, low_open=True, static=True
    )
    _checks.check_real("weight_decay", weight_decay, low=0.0)
    if small_tx is not None:
        _checks.check_transformation("small_tx", small_tx)
    switch_step = int(round(float(large_fraction) * total_steps))
    if switch_step >= total_steps:
        logging.warning(
            "two_regimes_sgd: switch_step=%d >= total_steps=%d, so phase 1 never runs "
            "(large_fraction=%r)",
            switch_step,
            total_steps,
            large_fraction,
        )
    small = small_tx if small_tx is not None else optax.adam(1e-3)
    return two_regimes(
        optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate)),
        optax.chain(optax.add_decayed_weights(weight_decay), small),
        switch_step=switch_step,
        reinit_small_at_switch=reinit_small_at_switch,
    )


@_checks.renamed_args(state="opt_state")
def phase_of(opt_state: optax.OptState) -> jax.Array:
    """The latched phase (int32; 0 large step, 1 small step) of a :func:`two_regimes` state.

    ``opt_state`` may be the :class:`TwoRegimesState` itself or any optax state holding exactly
    one (inside ``chain``, ``partition``, ``inject_hyperparams``, ...). A loop can act on it,
    e.g. switch to a larger batch in phase 1 (one extra compile for the new shape).

    Args:
      opt_state: an optimizer state (the former name ``state=`` still works for one release,
        with a ``DeprecationWarning``).

    Returns:
      The ``phase`` array (int32 scalar; batched under ``vmap``).

    Raises:
      ValueError: if ``opt_state`` holds no :class:`TwoRegimesState`, or more than one.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(optax.clip(1.0), two_regimes(optax.sgd(1.0), optax.sgd(0.1),
      ...                  switch_step=0))
      >>> s = tx.init({"w": jnp.zeros(())})
      >>> _, s = tx.update({"w": jnp.ones(())}, s, {"w": jnp.zeros(())})
      >>> print(int(phase_of(s)))
      1
    """
    return _checks.find_state("opt_state", opt_state, TwoRegimesState).phase
