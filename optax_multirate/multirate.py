"""Multirate training: parts of a network, or copies of it, on different time scales.

Three transformations after Vlaar & Leimkuhler (2022), all pure ``optax`` transformations:

* :func:`multirate` / :func:`multirate_sgd`: a fast/slow partition of the parameters
  (Algorithm 1 with linear drift, or without). The slow part is differentiated once per cycle
  of ``k`` steps, and the partition is **phased** (phase 0 reads fast and slow gradients,
  phase 1 reads fast ones only), so :class:`optax_multirate.PhasedStep` skips the backward
  pass below the fast part on ``k - 1`` of every ``k`` steps.
* :func:`multirate_subgroups` with :func:`apply_slow_mask`: training from scratch with random
  subgroups of weights as slow parameters (a regularizer; full gradients every step).
* :func:`multirate_timescales`: the whole network on several time scales at once, copies
  trained with step sizes ``h`` and ``k h`` and averaged whenever they meet (full gradients
  every step).

Notation: ``learning_rate`` is always the fast step ``h_F``; the slow step is
``h_S = k * h_F``.

References:
  Vlaar & Leimkuhler, `Multirate Training of Neural Networks
  <https://arxiv.org/abs/2106.10771>`_, ICML 2022.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_multirate import _checks
from optax_multirate import labels as labels_lib
from optax_multirate.phases import PhaseTag, phase_tag, set_phase, zero_unread

__all__ = [
    "MultirateState",
    "MultirateSlowState",
    "multirate",
    "multirate_sgd",
    "MultirateSubgroupsState",
    "multirate_subgroups",
    "apply_slow_mask",
    "MultirateTimescalesState",
    "multirate_timescales",
]

FAST = "fast"
SLOW = "slow"
RANDOM = "random"
#: Labels read by each phase of :func:`multirate`: 0 = cycle start, 1 = fast-only step.
PHASE_READS: dict[int, frozenset[str]] = {0: frozenset({FAST, SLOW}), 1: frozenset({FAST})}

# --------------------------------------------------------------------------- helpers


def _check_lr_momentum(learning_rate: Any, momentum: Any) -> None:
    _checks.check_real("learning_rate", learning_rate, low=0.0, low_open=True, allow_schedule=True)
    _checks.check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)


def _lr_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


def _labels_fn(param_labels: Any, allowed: set[str], name: str = "param_labels"):
    """A callable for ``optax.partition`` that also accepts the full tree where holes are."""
    return lambda tree: labels_lib.resolve_labels(param_labels, tree, allowed=allowed, name=name)


# --------------------------------------------------------------------------- fast/slow


class MultirateSlowState(NamedTuple):
    """State of the slow group of :func:`multirate` with linear drift.

    Attributes:
      count: int32 scalar, update calls so far (cycle start when ``count % k == 0``).
      slow_state: state of ``slow_tx`` (advances once per cycle).
      held: the slow update ``U / k`` computed at the last cycle start (slow leaves only).
    """

    count: jax.Array  # int32 []
    slow_state: optax.OptState
    held: optax.Updates


class MultirateState(NamedTuple):
    """State of :func:`multirate`.

    Attributes:
      count: int32 scalar, update calls so far (saturates at int32 max; cycling stops there).
      inner_state: the ``optax.partition`` state: ``inner_states["fast"]`` wraps
        ``fast_tx``'s state, ``inner_states["slow"]`` a :class:`MultirateSlowState` (drift),
        an ``optax.ConditionallyMaskState`` (no drift) or ``slow_tx``'s state (``k = 1``).
      tag: the :class:`~optax_multirate.PhaseTag`; phase 0 (cycle start) reads fast and slow
        gradients, phase 1 fast ones only.
    """

    count: jax.Array  # int32 []
    inner_state: optax.OptState
    tag: PhaseTag


def _hold_slow(slow_tx: optax.GradientTransformation, k: int) -> optax.GradientTransformation:
    """Calls ``slow_tx`` at cycle starts and emits its update ``U / k`` on each of ``k`` steps."""
    slow_tx = optax.with_extra_args_support(slow_tx)

    def init_fn(params):
        return MultirateSlowState(
            jnp.zeros([], jnp.int32), slow_tx.init(params), optax.tree.zeros_like(params)
        )

    def update_fn(updates, state, params=None, **extra):
        def start(_):
            u, s = slow_tx.update(updates, state.slow_state, params, **extra)
            held = jax.tree.map(lambda x: x / k, u) if k > 1 else u
            return held, s

        def hold(_):
            return state.held, state.slow_state

        held, slow_state = jax.lax.cond(state.count % k == 0, start, hold, None)
        count = optax.safe_increment(state.count)
        return held, MultirateSlowState(count, slow_state, held)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def multirate(
    fast_tx: optax.GradientTransformation,
    slow_tx: optax.GradientTransformation,
    k: int,
    param_labels: Any,
    linear_drift: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Multirate training of a fast/slow partition: the slow part sees a gradient every k steps.

    Cycles of ``k`` steps, counted globally (they cross epochs). At a cycle start (phase 0) both
    parts are differentiated and ``slow_tx`` is called once on the slow gradient, giving an
    update ``U``. The fast part is updated by ``fast_tx`` on every step. With ``linear_drift``
    the slow part moves by ``U / k`` on each of the cycle's ``k`` steps (a zero-order hold of
    its velocity), otherwise by ``U`` at the cycle start and not at all on the other steps.
    The other ``k - 1`` steps (phase 1) read only the fast gradients; slow gradients fed to
    them are ignored with ``jnp.where`` (zeros, garbage or NaN change nothing), and
    :class:`optax_multirate.PhasedStep` does not compute them.

    Args:
      fast_tx: optimizer of the fast leaves (called every step, on fast leaves only).
      slow_tx: optimizer of the slow leaves (called once per cycle: its count counts cycles).
      k: cycle length, an int ``>= 1`` (static).
      param_labels: tree (or callable ``params -> tree``) of ``"fast"``/``"slow"`` labels
        matching the params, as for ``optax.partition`` (e.g. from
        :func:`optax_multirate.rule_labels`).
      linear_drift: move the slow part by ``U / k`` every step (default, Algorithm 1) rather
        than by ``U`` at the cycle start.

    Returns:
      A ``GradientTransformationExtraArgs`` (extra args go to both inner optimizers) whose
      state is a :class:`MultirateState`.

    Raises:
      TypeError: if ``k`` is not an int (Python or numpy; a traced ``k``: pass it in
        ``static_args``), ``fast_tx`` or ``slow_tx`` is not an ``optax.GradientTransformation``
        or ``linear_drift`` is not a bool.
      ValueError: if ``k < 1``; at ``init`` if a label is not ``"fast"`` or ``"slow"``, the
        labels do not match the params, or no leaf is labelled ``"fast"`` or ``"slow"``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> p = {"body": jnp.zeros(()), "head": jnp.zeros(())}
      >>> tx = multirate(optax.sgd(0.1), optax.sgd(0.2), 2, {"body": "slow", "head": "fast"})
      >>> s = tx.init(p)
      >>> for t in range(3):
      ...     u, s = tx.update({"body": jnp.ones(()), "head": jnp.ones(())}, s, p)
      ...     print(f"{float(u['body']):.2f} {float(u['head']):.2f} {int(s.tag.phase)}")
      -0.10 -0.10 1
      -0.10 -0.10 0
      -0.10 -0.10 1

    References:
      Vlaar & Leimkuhler, `Multirate Training of Neural Networks
      <https://arxiv.org/abs/2106.10771>`_, ICML 2022 (Algorithm 1).

    Notes:
      Put gradient clipping inside ``fast_tx``/``slow_tx``: a transformation placed before
      ``multirate`` sees zeros for the slow part on phase-1 steps. An outer
      ``optax.MultiSteps`` breaks the correspondence between phases and train steps (it calls
      ``update`` once per ``every_k`` steps): do not wrap ``multirate`` in it. Under
      ``optax.inject_hyperparams`` pass ``k`` and ``param_labels`` in ``static_args``.
    """
    k = _checks.check_int("k", k, low=1, static=True)
    _checks.check_transformation("fast_tx", fast_tx)
    _checks.check_transformation("slow_tx", slow_tx)
    linear_drift = _checks.check_bool("linear_drift", linear_drift)
    labels_fn = _labels_fn(param_labels, {FAST, SLOW})
    if k == 1:  # every step is a cycle start: the plain partition (bitwise, no lax.cond)
        slow = slow_tx
    elif linear_drift:
        slow = _hold_slow(slow_tx, k)
    else:
        slow = optax.conditionally_mask(slow_tx, lambda step: step % k == 0)
    inner = optax.partition({FAST: fast_tx, SLOW: slow}, labels_fn)

    def init_fn(params):
        by_path = labels_lib.check_labels(
            param_labels, params, allowed={FAST, SLOW}, name="param_labels"
        )
        for lab in (FAST, SLOW):
            if lab not in by_path.values():
                raise ValueError(
                    f"param_labels labels no param {lab!r} (labels found: "
                    f"{sorted(set(map(str, by_path.values())))}); a rule that matches nothing "
                    "is almost always a bug"
                )
        tag = phase_tag(params, param_labels, PHASE_READS, name="multirate")
        return MultirateState(jnp.zeros([], jnp.int32), inner.init(params), tag)

    def update_fn(updates, state, params=None, **extra):
        # Gate on the incoming phase: unread (slow) gradients become zeros, NaN-safe.
        updates = zero_unread(updates, state.tag)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
        count = optax.safe_increment(state.count)
        tag = set_phase(state.tag, jnp.where(count % k == 0, 0, 1))
        return updates, MultirateState(count, inner_state, tag)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def multirate_sgd(
    learning_rate: optax.ScalarOrSchedule,
    k: int,
    param_labels: Any,
    momentum: float = 0.9,
    linear_drift: bool = True,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Multirate SGD with momentum (Algorithm 1): slow part updated from one gradient per cycle.

    With fast step :math:`h_F` = ``learning_rate``, momentum :math:`\mu`, step index
    :math:`t = 0, 1, \dots` and :math:`s_t = [t \bmod k = 0]` (cycle start):

    .. math::
      p_S \leftarrow s_t\,(\mu p_S + g_S) + (1 - s_t)\,p_S, \quad
      p_F \leftarrow \mu p_F + g_F, \quad
      \theta_F \leftarrow \theta_F - h_F p_F, \quad
      \theta_S \leftarrow \theta_S - h_F p_S,

    so the slow part moves :math:`h_S p_S` per cycle with :math:`h_S = k h_F`. Without linear
    drift it moves :math:`h_S p_S` at the cycle start and not in between. Weight decay is
    coupled L2 (``g + wd * theta``) inside each part, so the slow part's enters at cycle starts.
    With ``k = 1`` this is exactly ``optax.sgd(learning_rate, momentum)``.

    Args:
      learning_rate: the fast step :math:`h_F` (float > 0 or a schedule of the global step;
        the slow part uses ``k * schedule(t)`` at each cycle start ``t``).
      k: cycle length, an int ``>= 1`` (static).
      param_labels: ``"fast"``/``"slow"`` label tree or callable, as for :func:`multirate`.
      momentum: :math:`\mu` in ``[0, 1)``.
      linear_drift: Algorithm 1's drift (default) or one slow jump per cycle.
      weight_decay: coupled L2 coefficient ``>= 0``.

    Returns:
      A :func:`multirate` transformation (state :class:`MultirateState`).

    Raises:
      TypeError: for an argument of the wrong type (a string or None for a number, a float
        ``k``, ...).
      ValueError: for ``learning_rate`` not finite and > 0, ``momentum`` outside ``[0, 1)``,
        ``weight_decay`` < 0 or not finite, or ``k < 1``; at ``init`` as :func:`multirate`.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"body": jnp.zeros(()), "head": jnp.zeros(())}
      >>> lab = {"body": "slow", "head": "fast"}
      >>> tx = multirate_sgd(0.1, 2, lab, momentum=0.0, linear_drift=False)
      >>> s = tx.init(p)
      >>> for t in range(3):
      ...     u, s = tx.update({"body": jnp.ones(()), "head": jnp.ones(())}, s, p)
      ...     print(f"{float(u['body']):.2f} {float(u['head']):.2f}")
      -0.20 -0.10
      0.00 -0.10
      -0.20 -0.10

    References:
      Vlaar & Leimkuhler, `Multirate Training of Neural Networks
      <https://arxiv.org/abs/2106.10771>`_, ICML 2022.
    """
    k = _checks.check_int("k", k, low=1, static=True)
    _check_lr_momentum(learning_rate, momentum)
    _checks.check_real("weight_decay", weight_decay, low=0.0)
    if callable(learning_rate):
        schedule = learning_rate
        slow_lr: optax.ScalarOrSchedule = lambda c: k * schedule(c * k)
    else:
        slow_lr = k * learning_rate if k > 1 else learning_rate

    def sgd(lr):
        base = optax.sgd(lr, momentum=momentum)
        if isinstance(weight_decay, (int, float)) and weight_decay == 0:
            return base  # (an array, as under inject_hyperparams, always gets the chain)
        return optax.chain(optax.add_decayed_weights(weight_decay), base)

    return multirate(sgd(learning_rate), sgd(slow_lr), k, param_labels, linear_drift)


# --------------------------------------------------------------------------- random subgroups


class MultirateSubgroupsState(NamedTuple):
    """State of :func:`multirate_subgroups`.

    Attributes:
      count: int32 scalar, update calls so far; position in the cycle is ``count % (k + 1)``.
      slow_step: bool scalar, True when the next update is the cycle's slow step.
      key: uint32 ``[2]`` PRNG key of the next mask draw.
      mask: bool tree like the params, True where an entry is slow in this cycle (always
        False on ``"fast"`` leaves).
      momentum: float tree like the params, per-entry momentum buffers.
    """

    count: jax.Array  # int32 []
    slow_step: jax.Array  # bool []
    key: jax.Array  # uint32 [2]
    mask: optax.Params
    momentum: optax.Updates


def _subgroup_labels(params: Any, param_labels: Any) -> dict[str, Hashable]:
    if param_labels is None:
        param_labels = jax.tree_util.tree_map_with_path(
            lambda p, _: (
                FAST if labels_lib.path_str(p).rsplit("/", 1)[-1] in ("bias", "scale") else RANDOM
            ),
            params,
        )
    by_path = labels_lib.check_labels(
        param_labels, params, allowed={FAST, RANDOM}, name="param_labels"
    )
    if RANDOM not in by_path.values():
        raise ValueError("param_labels labels no param 'random': there is nothing to draw from")
    return by_path


def _keep(key: jax.Array, mask: Any) -> tuple[jax.Array, Any]:
    return key, mask


def _draw_mask(key: jax.Array, params: Any, eligible: Sequence[bool], q: float) -> Any:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [
        jax.random.bernoulli(kk, q, jnp.shape(x)) if e else jnp.zeros(jnp.shape(x), bool)
        for kk, x, e in zip(keys, leaves, eligible)
    ]
    return jax.tree.unflatten(treedef, out)


def multirate_subgroups(
    learning_rate: optax.ScalarOrSchedule,
    k: int,
    slow_fraction: float = 0.5,
    *,
    seed: int = 0,
    momentum: float = 0.0,
    param_labels: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Multirate training from scratch with random subgroups of weights as slow parameters.

    Cycles of ``k + 1`` steps. At each cycle start a Bernoulli(``slow_fraction``) mask
    :math:`M` is drawn per entry of every ``"random"`` leaf (kernels by default; biases and
    normalization scales are always fast). Steps ``1..k`` are fast steps: the forward pass uses
    :math:`\theta \odot (1 - M)` (:func:`apply_slow_mask`) and only the unmasked entries move,
    with step :math:`h_F`. Step ``k + 1`` is the slow step: the forward pass uses the full
    :math:`\theta` and only the masked entries move, with step :math:`k h_F`. A new mask is
    then drawn from the key in the state. With momentum, each entry's buffer advances only on
    the steps that move it. Element-wise masks save no compute: this is a regularizer, and it
    needs full gradients every step (no phases).

    Args:
      learning_rate: the fast step :math:`h_F` (float > 0 or a schedule of the step count).
      k: fast steps per cycle, an int ``>= 1`` (static).
      slow_fraction: probability :math:`q` that an entry is slow, in ``(0, 1)``.
      seed: seed of the mask draws: an int, or a raw ``uint32[2]`` key (which may be traced,
        e.g. to build one state per seed under ``jax.vmap``).
      momentum: momentum in ``[0, 1)`` (0, plain SGD, as in the paper's setup).
      param_labels: tree or callable of ``"random"``/``"fast"`` labels; None: leaves named
        ``bias`` or ``scale`` are ``"fast"``, all others ``"random"``.

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`MultirateSubgroupsState`.

    Raises:
      TypeError: for an argument of the wrong type (a float ``k``, a ``seed`` that is neither
        an int nor a ``uint32[2]`` key, a string for a number, ...).
      ValueError: for ``k < 1``, ``learning_rate`` not finite and > 0, ``momentum`` outside
        ``[0, 1)`` or ``slow_fraction`` outside ``(0, 1)``; at ``init`` for labels other than
        ``"random"``/``"fast"``, labels that do not match the params, or no ``"random"`` leaf.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> p = {"kernel": jnp.ones(4), "bias": jnp.ones(())}
      >>> tx = multirate_subgroups(0.1, k=2, slow_fraction=0.5, seed=0)
      >>> s = tx.init(p)
      >>> for t in range(3):
      ...     fwd = apply_slow_mask(p, s)
      ...     u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
      ...     moved = int(jnp.sum(u["kernel"] != 0))
      ...     print(f"{int(jnp.sum(fwd['kernel'] == 0))} {moved} {float(u['bias']):.1f}")
      3 1 -0.1
      3 1 -0.1
      0 3 0.0

    References:
      Vlaar & Leimkuhler, `Multirate Training of Neural Networks
      <https://arxiv.org/abs/2106.10771>`_, ICML 2022.
    """
    k = _checks.check_int("k", k, low=1, static=True)
    _check_lr_momentum(learning_rate, momentum)
    _checks.check_real(
        "slow_fraction", slow_fraction, low=0.0, high=1.0, low_open=True, high_open=True
    )
    if isinstance(seed, (np.ndarray, jax.Array)) and seed.shape == (2,) and seed.dtype == np.uint32:
        base_key = seed  # a raw key, e.g. one per seed under jax.vmap
    else:
        base_key = jax.random.PRNGKey(_checks.check_int("seed", seed, static=True))

    def eligible(params):
        by_path = _subgroup_labels(params, param_labels)
        return [by_path[p] == RANDOM for p in labels_lib.leaf_paths(params)]

    @functools.cache
    def _redraw(flags: tuple[bool, ...]) -> Any:
        # One function per leaf pattern, so that lax.cond finds its traced branches again on
        # every call (a new closure per call would retrace and recompile outside jit).
        def redraw(key, mask):  # no random bits on fast steps: only the slow step redraws
            key, sub = jax.random.split(key)
            return key, _draw_mask(sub, mask, flags, slow_fraction)

        return redraw

    def init_fn(params):
        key, sub = jax.random.split(base_key)
        mask = _draw_mask(sub, params, eligible(params), slow_fraction)
        return MultirateSubgroupsState(
            jnp.zeros([], jnp.int32),
            jnp.zeros([], bool),
            key,
            mask,
            optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        slow_step = state.slow_step
        h = _lr_at(learning_rate, state.count)
        lr = jnp.where(slow_step, k * h, h)

        def leaf(g, p, m):
            active = jnp.where(slow_step, m, jnp.logical_not(m))
            p_new = jnp.where(active, momentum * p + g, p)
            return jnp.where(active, -lr * p_new, jnp.zeros_like(g)).astype(g.dtype), p_new

        out = jax.tree.map(leaf, updates, state.momentum, state.mask)
        treedef = jax.tree.structure(updates)
        pairs = treedef.flatten_up_to(out)
        new_updates = treedef.unflatten([u for u, _ in pairs])
        new_momentum = treedef.unflatten([p for _, p in pairs])
        redraw = _redraw(tuple(eligible(updates)))  # after the slow step only
        key, mask = jax.lax.cond(slow_step, redraw, _keep, state.key, state.mask)
        count = optax.safe_increment(state.count)
        next_slow = count % (k + 1) == k
        return new_updates, MultirateSubgroupsState(count, next_slow, key, mask, new_momentum)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apply_slow_mask(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
    r"""The params the next forward pass of :func:`multirate_subgroups` uses.

    On fast steps the slow entries are switched off, :math:`\theta \odot (1 - M)` (with
    ``jnp.where``); on the slow step the full :math:`\theta` is returned. Differentiate the
    loss at these params and pass the gradient to ``update`` with the unmasked params::

      grads = jax.grad(loss_fn)(apply_slow_mask(params, opt_state), batch)
      updates, opt_state = tx.update(grads, opt_state, params)

    Args:
      params: the params (same structure as at ``init``).
      opt_state: a :class:`MultirateSubgroupsState`, or any optimizer state holding one.

    Returns:
      Params with the slow entries zeroed on fast steps.

    Raises:
      ValueError: if ``opt_state`` holds no or several :class:`MultirateSubgroupsState`.
    """
    state = _checks.find_state("opt_state", opt_state, MultirateSubgroupsState)
    off = jnp.logical_not(state.slow_step)
    return jax.tree.map(
        lambda x, m: jnp.where(jnp.logical_and(m, off), jnp.zeros_like(x), x),
        params,
        state.mask,
    )


# --------------------------------------------------------------------------- time scales


class MultirateTimescalesState(NamedTuple):
    """State of :func:`multirate_timescales`.

    Attributes:
      count: int32 scalar, update calls so far.
      momentum: one float tree like the params per brain; ``momentum[0]`` is the momentum of
        the live params (brain 0, the fastest).
      brains: the params of brains ``1..n-1`` (one tree each), valid between their cycle start
        and their next merge.
    """

    count: jax.Array  # int32 []
    momentum: tuple[optax.Updates, ...]
    brains: tuple[optax.Params, ...]


def multirate_timescales(
    learning_rate: optax.ScalarOrSchedule,
    multipliers: Sequence[int] = (1, 10),
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""The whole network on several time scales at once: copies merged whenever they meet.

    Brain :math:`i` takes SGD steps of size :math:`m_i h` (``m = multipliers``,
    :math:`h` = ``learning_rate``), one every :math:`n_i = m_i / m_0` train steps, so all
    brains advance the same "time" per step. The live params are brain 0 (one step every train
    step); the other brains live in the state. Brain :math:`i` starts a cycle at steps
    :math:`t \equiv 0 \pmod{n_i}`, from the live params and with the gradient the live params
    got on that step (same point, same batch: no extra backward pass):

    .. math::
      p_i \leftarrow \mu p_i + g, \qquad \theta_i \leftarrow \theta - m_i h\, p_i .

    After step :math:`t`, every brain with :math:`(t + 1) \equiv 0 \pmod{n_i}` meets brain 0,
    and the live params become the average of the brains that meet:
    :math:`\theta \leftarrow \frac{1}{|S|}\sum_{i \in S} \theta_i`, with brain 0's own step
    :math:`\theta_0 = \theta - m_0 h\, p_0` included. Two brains ``(1, k)`` give
    :math:`\theta \leftarrow \tfrac12(\theta_A + \theta_B)` every ``k`` steps; three
    ``(1, k_1, k_2)`` average two copies at multiples of :math:`k_1` and all three at multiples
    of :math:`k_2`. Each brain keeps its own momentum. Evaluate the live params right after a
    merge of all brains (after a multiple of :math:`n_{\text{last}}` steps) to see the merged
    network. Memory: one params copy and one momentum per extra brain; full gradients every
    step (no phases).

    Args:
      learning_rate: the fast step :math:`h` (float > 0 or a schedule of the step count; a
        brain's step uses its value at the brain's cycle start).
      multipliers: step multipliers :math:`m_0 < m_1 < \dots`, at least two positive ints, each
        dividing the next (static).
      momentum: :math:`\mu` in ``[0, 1)``, for every brain.
      weight_decay: coupled L2 coefficient ``>= 0`` (added to the gradient of every brain).

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`MultirateTimescalesState`. Its
      ``update`` needs ``params``.

    Raises:
      TypeError: for ``multipliers`` that is not a sequence of ints, or a number argument of
        the wrong type.
      ValueError: for ``multipliers`` that are fewer than two, not positive, not increasing or
        not each dividing the next, or a bad ``learning_rate``, ``momentum`` or
        ``weight_decay``; at ``update`` if ``params`` is None (as optax's transformations that
        need params).

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = multirate_timescales(0.1, multipliers=(1, 2), momentum=0.0)
      >>> p = jnp.zeros(())
      >>> s = tx.init(p)
      >>> for t in range(4):
      ...     u, s = tx.update(jnp.ones(()), s, p)
      ...     p = p + u
      ...     print(f"{float(p):.2f}")
      -0.10
      -0.20
      -0.30
      -0.40

    References:
      Vlaar & Leimkuhler, `Multirate Training of Neural Networks
      <https://arxiv.org/abs/2106.10771>`_, ICML 2022; the "several brains" form follows
      the authors' NUMDIFF-16 slides.
    """
    ms = _checks.check_int_sequence("multipliers", multipliers, low=1, min_len=2)
    if not all(b > a and b % a == 0 for a, b in zip(ms, ms[1:])):
        raise ValueError(
            "multipliers must be increasing, each dividing the next (e.g. (1, 10) or "
            f"(1, 5, 25)), got {multipliers!r}"
        )
    _check_lr_momentum(learning_rate, momentum)
    _checks.check_real("weight_decay", weight_decay, low=0.0)
    periods = tuple(m // ms[0] for m in ms)

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        return MultirateTimescalesState(
            jnp.zeros([], jnp.int32),
            tuple(zeros for _ in ms),
            tuple(jax.tree.map(jnp.array, params) for _ in ms[1:]),
        )

    def update_fn(updates, state, params=None, **extra):
        del extra
        if params is None:
            raise ValueError("multirate_timescales needs params in update (brains are params)")
        t = state.count
        h = _lr_at(learning_rate, t)
        g = jax.tree.map(lambda g, x: g + weight_decay * x, updates, params)
        p0 = jax.tree.map(lambda p, g: momentum * p + g, state.momentum[0], g)
        u0 = jax.tree.map(lambda p: -(ms[0] * h) * p, p0)
        momenta, brains, meets = [p0], [], []
        for i in range(1, len(ms)):
            start = t % periods[i] == 0
            pi = jax.tree.map(
                lambda p, g, s=start: jnp.where(s, momentum * p + g, p), state.momentum[i], g
            )
            bi = jax.tree.map(
                lambda b, x, p, s=start, m=ms[i]: jnp.where(s, x - (m * h) * p, b),
                state.brains[i - 1],
                params,
                pi,
            )
            momenta.append(pi)
            brains.append(bi)
            meets.append((t + 1) % periods[i] == 0)
        num = 1 + sum(m.astype(jnp.int32) for m in meets)

        def merge(x, u, *bs):
            total = x + u
            for b, m in zip(bs, meets):
                total = total + jnp.where(m, b, jnp.zeros_like(b))
            return jnp.where(num > 1, total / num.astype(x.dtype) - x, u).astype(u.dtype)

        new_updates = jax.tree.map(merge, params, u0, *brains)
        merged = jax.tree.map(lambda x, u: x + u, params, new_updates)
        brains = [
            jax.tree.map(lambda b, y, m=m: jnp.where(m, y, b), bi, merged)
            for bi, m in zip(brains, meets)
        ]
        count = optax.safe_increment(t)
        return new_updates, MultirateTimescalesState(count, tuple(momenta), tuple(brains))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
