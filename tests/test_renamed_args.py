"""Renamed arguments: each old keyword name still works for one release, warns, and gives
the same result as the new name.

The library's vocabulary follows optax: a label tree is ``param_labels`` (LeRaC's integer
depths included), one wrapped optimizer is ``inner``, the two optimizers of two regimes are
``large_tx`` and ``small_tx``, a learning rate is ``learning_rate`` and an optimizer state
handed to a helper is ``opt_state``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_multirate as om

P = {
    "Dense_0": {"bias": jnp.zeros(3), "kernel": jnp.ones((2, 3))},
    "head": {"bias": jnp.zeros(2), "kernel": jnp.ones((3, 2))},
}
WB = {"Dense_0": {"bias": "bias", "kernel": "weight"}, "head": {"bias": "bias", "kernel": "weight"}}
FZ = {"Dense_0": {"bias": "body", "kernel": "body"}, "head": {"bias": "head", "kernel": "head"}}
DEPTH = {"Dense_0": {"bias": 0, "kernel": 0}, "head": {"bias": 1, "kernel": 1}}
SGD = optax.sgd(0.1)

# (factory of the remaining arguments, old name, new name, the value passed under either)
TRANSFORMATIONS: dict[str, tuple[Callable[..., Any], str, str, Any]] = {
    "scale_by_lerac-depth_labels": (
        lambda **kw: optax.chain(SGD, om.scale_by_lerac(k=2, **kw)),
        "depth_labels",
        "param_labels",
        DEPTH,
    ),
    "lerac-base_optimizer": (
        lambda **kw: om.lerac(param_labels=DEPTH, k=2, **kw),
        "base_optimizer",
        "inner",
        optax.adam(0.1),
    ),
    "lerac-depth_labels": (
        lambda **kw: om.lerac(SGD, k=2, **kw),
        "depth_labels",
        "param_labels",
        DEPTH,
    ),
    "wus-labels": (
        lambda **kw: om.wus(SGD, warmup=0, window=1, force_windows=(1,), **kw),
        "labels",
        "param_labels",
        WB,
    ),
    "freeze_schedule-labels": (
        lambda **kw: om.freeze_schedule(SGD, frozen={"body": (0, 2)}, **kw),
        "labels",
        "param_labels",
        FZ,
    ),
    "two_regimes-large_step": (
        lambda **kw: om.two_regimes(small_tx=optax.sgd(0.01), switch_step=1, **kw),
        "large_step",
        "large_tx",
        optax.sgd(1.0),
    ),
    "two_regimes-small_step": (
        lambda **kw: om.two_regimes(optax.sgd(1.0), switch_step=1, **kw),
        "small_step",
        "small_tx",
        optax.adam(0.1),
    ),
    "two_regimes_sgd-small_step": (
        lambda **kw: om.two_regimes_sgd(0.1, total_steps=2, large_fraction=0.5, **kw),
        "small_step",
        "small_tx",
        optax.sgd(0.3),
    ),
    "two_regimes_sgd-lr_large": (
        lambda **kw: om.two_regimes_sgd(total_steps=2, large_fraction=0.5, **kw),
        "lr_large",
        "learning_rate",
        0.3,
    ),
}


def _updates(tx: optax.GradientTransformation, steps: int = 3) -> list[Any]:
    tx = optax.with_extra_args_support(tx)
    state, out = tx.init(P), []
    for t in range(steps):
        g = jax.tree.map(lambda x, t=t: jnp.full_like(x, 1.0 + t), P)
        u, state = tx.update(g, state, P, value=0.5)
        out.append(u)
    return out


def _new_and_old(build: Callable[..., Any], old: str, new: str, value: Any) -> tuple[Any, Any]:
    """``build(new=value)`` (no warning) and ``build(old=value)`` (a DeprecationWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_new = build(**{new: value})
    with pytest.warns(DeprecationWarning, match=f"{old}=.*deprecated.*use {new}="):
        with_old = build(**{old: value})
    return with_new, with_old


@pytest.mark.parametrize("case", list(TRANSFORMATIONS))
def test_old_name_warns_and_builds_the_same_transformation(case):
    build, old, new, value = TRANSFORMATIONS[case]
    with_new, with_old = _new_and_old(build, old, new, value)
    for a, b in zip(jax.tree.leaves(_updates(with_new)), jax.tree.leaves(_updates(with_old))):
        np.testing.assert_array_equal(a, b)


def test_phase_tag_labels():
    build = lambda **kw: om.phase_tag(P, reads={0: {"weight", "bias"}, 1: {"bias"}}, **kw)
    with_new, with_old = _new_and_old(build, "labels", "param_labels", WB)
    assert (with_new.paths, with_new.reads) == (with_old.paths, with_old.reads)


@pytest.mark.parametrize(
    "helper,tx",
    [
        (om.wus_phase, om.wus(SGD, WB, warmup=0, window=2, force_windows=(1,))),
        (om.phase_of, om.two_regimes(SGD, optax.sgd(0.01), switch_step=1)),
    ],
    ids=["wus_phase", "phase_of"],
)
def test_state_is_opt_state(helper, tx):
    tx = optax.with_extra_args_support(tx)
    state = tx.init(P)
    for _ in range(2):
        _, state = tx.update(P, state, P, value=0.5)
    with_new, with_old = _new_and_old(helper, "state", "opt_state", optax.chain(tx).init(P))
    assert int(with_new) == int(with_old) == 0
    with_new, with_old = _new_and_old(helper, "state", "opt_state", state)
    assert int(with_new) == int(with_old) == int(helper(state)) == 1  # positional: unchanged


def test_old_and_new_name_together_is_a_type_error():
    with pytest.raises(TypeError, match="param_labels"):
        om.wus(SGD, labels=WB, param_labels=WB)
