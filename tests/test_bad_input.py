"""The bad-input battery: every public constructor refuses what it documents it refuses.

Each case builds something with one bad argument (out of range, or of a wrong type) and
expects a ``ValueError`` or ``TypeError`` raised by the library itself (the innermost frame in
``optax_multirate/`` or ``benchmarks/``, never a trace from inside JAX, XLA, optax or orbax),
whose message names the argument and quotes the value. Label trees that do not match the
params and rules that match nothing fail at ``init``, naming the path or the rule. Unknown data
sets name the embedded ones; a checkpoint of another model names the mismatched path; and a
failing run never loses or overwrites what was written before (results files, checkpoints).

The promises tested here are those of each module's docstrings and of its page in ``docs/``
(the errors and edge cases it lists). A case that exposes a bug in a module is marked
``xfail(strict=True)`` with the bug in its reason (the module's owner fixes it; the mark then
fails and must go).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pathlib
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_multirate as om
from benchmarks import harness
from optax_multirate import train as train_lib
from optax_multirate.data import (
    Split,
    batches,
    filter_classes,
    load_dataset,
    num_batches,
    validation_split,
)
from optax_multirate.models import MLP, widths

REPO = pathlib.Path(__file__).resolve().parents[1]
OURS = (REPO / "optax_multirate", REPO / "benchmarks")
NO_VALUE = object()  # the case has no single value to quote

P = {
    "Dense_0": {"bias": jnp.zeros(3), "kernel": jnp.ones((2, 3))},
    "head": {"bias": jnp.zeros(2), "kernel": jnp.ones((3, 2))},
}
WB = {"Dense_0": {"bias": "bias", "kernel": "weight"}, "head": {"bias": "bias", "kernel": "weight"}}
MR = {"Dense_0": {"bias": "slow", "kernel": "slow"}, "head": {"bias": "fast", "kernel": "fast"}}
FZ = {"Dense_0": {"bias": "body", "kernel": "body"}, "head": {"bias": "head", "kernel": "head"}}
DEPTH = {"Dense_0": {"bias": 0, "kernel": 0}, "head": {"bias": 1, "kernel": 1}}
SGD = optax.sgd(0.1)


def _assert_ours(info: pytest.ExceptionInfo, arg: str, value: Any = NO_VALUE) -> None:
    """The error names ``arg``, quotes ``value`` and was raised by the library itself."""
    msg = str(info.value)
    assert arg in msg, f"{arg!r} not named in: {msg}"
    if value is not NO_VALUE:
        quoted = {repr(value), str(value)}
        if isinstance(value, float) and math.isnan(value):
            quoted.add("nan")
        assert any(q in msg for q in quoted), f"value {value!r} not quoted in: {msg}"
    frame = pathlib.Path(traceback.extract_tb(info.tb)[-1].filename).resolve()
    assert any(frame.is_relative_to(root) for root in OURS), (
        f"raised from {frame}, not by the library: {type(info.value).__name__}: {msg}"
    )


T, V = TypeError, ValueError  # the expected class: a wrong type, or a value out of range


def _bad(
    build: Callable[[], Any],
    arg: str,
    value: Any = NO_VALUE,
    *,
    exc: type[Exception] | None = None,
    xfail: str = "",
    id=None,
):
    """One case: ``build()`` raises ``exc`` (TypeError for a value of the wrong type,
    ValueError for one out of range; None: either, for a case not yet classified)."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(build, arg, value, exc or (TypeError, ValueError), marks=marks, id=id)


def _init(tx_fn: Callable[[], optax.GradientTransformation], params: Any = P):
    return lambda: tx_fn().init(params)


NOT_A_TX = optax.sgd  # the factory instead of optax.sgd(lr): the commonest wrong type


def _run_once(tx: optax.GradientTransformation) -> Any:
    """init and one update: a wrong type must be refused by then, by the library."""
    state = tx.init(P)
    return tx.update(jax.tree.map(jnp.ones_like, P), state, P)


# ------------------------------------------------------------------------------ constructors

CONSTRUCTOR_CASES = [
    # freeze_schedule
    _bad(lambda: om.freeze_schedule(SGD, FZ, {}), "frozen", {}, exc=V, id="freeze-frozen-empty"),
    _bad(
        lambda: om.freeze_schedule(SGD, FZ, "body"), "frozen", "body", exc=T, id="freeze-frozen-str"
    ),
    *[
        _bad(lambda iv=iv: om.freeze_schedule(SGD, FZ, {"body": iv}), "frozen", iv, exc=e, id=i)
        for iv, e, i in [
            ((2, 1), V, "freeze-iv"),
            ((-1, 2), V, "freeze-neg"),
            ((0.5, 2), T, "freeze-f"),
            ((0, 2, 3), T, "freeze-triple"),
            ((True, 2), T, "freeze-bool"),
        ]
    ],
    _bad(
        lambda: om.freeze_schedule(NOT_A_TX, FZ, {"body": (0, 2)}).init(P),
        "inner",
        NOT_A_TX,
        exc=T,
        id="freeze-inner-type",
    ),
    # multirate
    *[
        _bad(lambda k=k: om.multirate(SGD, SGD, k, MR), "k", k, exc=e, id=f"multirate-k-{k!r}")
        for k, e in [(0, V), (-1, V), (2.5, T), ("3", T), (True, T), (None, T)]
    ],
    _bad(
        lambda: om.multirate(NOT_A_TX, SGD, 2, MR).init(P),
        "fast_tx",
        NOT_A_TX,
        exc=T,
        id="multirate-fast_tx-type",
    ),
    _bad(
        lambda: om.multirate(SGD, NOT_A_TX, 2, MR).init(P),
        "slow_tx",
        NOT_A_TX,
        exc=T,
        id="multirate-slow_tx-type",
    ),
    _bad(
        lambda: om.multirate(SGD, SGD, 2, MR, linear_drift="no"),
        "linear_drift",
        "no",
        exc=T,
        id="multirate-linear_drift-type",
    ),
    # multirate_sgd
    *[
        _bad(
            lambda v=v: om.multirate_sgd(v, 2, MR), "learning_rate", v, exc=e, id=f"mr_sgd-lr-{v!r}"
        )
        for v, e in [(0.0, V), (-0.1, V), (math.nan, V), (math.inf, V), (None, T)]
    ],
    *[
        _bad(build, arg, "0.1", exc=T, id=f"{name}-str")
        for name, arg, build in [
            ("mr_sgd-lr", "learning_rate", lambda: _run_once(om.multirate_sgd("0.1", 2, MR))),
            (
                "mr_sgd-mom",
                "momentum",
                lambda: _run_once(om.multirate_sgd(0.1, 2, MR, momentum="0.1")),
            ),
            ("subgroups-lr", "learning_rate", lambda: _run_once(om.multirate_subgroups("0.1", 2))),
            ("timescales-lr", "learning_rate", lambda: _run_once(om.multirate_timescales("0.1"))),
        ]
    ],
    *[
        _bad(
            lambda v=v: om.multirate_sgd(0.1, 2, MR, momentum=v),
            "momentum",
            v,
            exc=V,
            id=f"mr-mom-{v}",
        )
        for v in (1.0, -0.1, math.nan)
    ],
    *[
        _bad(
            lambda v=v: om.multirate_sgd(0.1, 2, MR, weight_decay=v),
            "weight_decay",
            v,
            exc=V,
            id=f"mr-wd-{v}",
        )
        for v in (-1e-3, math.nan)
    ],
    _bad(lambda: om.multirate_sgd(0.1, 0, MR), "k", 0, exc=V, id="mr_sgd-k-0"),
    # multirate_subgroups
    _bad(lambda: om.multirate_subgroups(0.1, 0), "k", 0, exc=V, id="subgroups-k"),
    _bad(lambda: om.multirate_subgroups(0.0, 2), "learning_rate", 0.0, exc=V, id="subgroups-lr"),
    *[
        _bad(
            lambda v=v: om.multirate_subgroups(0.1, 2, v),
            "slow_fraction",
            v,
            exc=V,
            id=f"subgroups-q-{v}",
        )
        for v in (0.0, 1.0, 1.5, math.nan)
    ],
    _bad(
        lambda: om.multirate_subgroups(0.1, 2, momentum=1.0),
        "momentum",
        1.0,
        exc=V,
        id="subgroups-mom",
    ),
    *[
        _bad(
            lambda v=v: om.multirate_subgroups(0.1, 2, seed=v),
            "seed",
            v,
            exc=T,
            id=f"subgroups-seed-{v!r}",
        )
        for v in ("0", 1.5, None)
    ],
    # multirate_timescales
    *[
        _bad(
            lambda v=v: om.multirate_timescales(0.1, v),
            "multipliers",
            v,
            exc=e,
            id=f"timescales-m-{v!r}",
        )
        for v, e in [
            ((1,), V),
            ((2, 3), V),
            ((1, 1), V),
            ((3, 1), V),
            ((0, 2), V),
            ((1, 2.5), T),
            ("12", T),
            ((True, 2), T),
        ]
    ],
    _bad(lambda: om.multirate_timescales(-0.1), "learning_rate", -0.1, exc=V, id="timescales-lr"),
    _bad(
        lambda: om.multirate_timescales(0.1, momentum=1.5),
        "momentum",
        1.5,
        exc=V,
        id="timescales-mom",
    ),
    _bad(
        lambda: om.multirate_timescales(0.1, weight_decay=-1.0),
        "weight_decay",
        -1.0,
        exc=V,
        id="ts-wd",
    ),
    # wus
    *[
        _bad(
            lambda v=v: om.wus(SGD, WB, threshold=v),
            "threshold",
            v,
            exc=e,
            id=f"wus-threshold-{v!r}",
        )
        for v, e in [(-1.0, V), (math.nan, V), (math.inf, V), ("a", T)]
    ],
    *[
        _bad(lambda a=a, v=v: om.wus(SGD, WB, **{a: v}), a, v, exc=e, id=f"wus-{a}-{v!r}")
        for a, vs in {
            "window": [(0, V), (1.5, T), (None, T)],
            "accumulation_size": [(0, V), (2.0, T)],
            "patience": [(0, V), (True, T)],
            "warmup": [(-1, V), (0.5, T)],
            "max_windows": [(-1, V), (1.5, T)],
            "lr_factor": [(0.0, V), (1.0, V), (1.5, V), (math.nan, V), ("0.5", T)],
            "min_lr_scale": [(-0.1, V), (1.5, V)],
        }.items()
        for v, e in vs
    ],
    _bad(lambda: om.wus(SGD, WB, keep=()), "keep", (), exc=V, id="wus-keep-empty"),
    *[
        _bad(
            lambda v=v: om.wus(SGD, WB, force_windows=v),
            "force_windows",
            v,
            exc=e,
            id=f"wus-fw-{v!r}",
        )
        for v, e in [((0,), V), ((2, 2), V), (("a",), T), (3, T)]
    ],
    _bad(lambda: om.wus(NOT_A_TX, WB).init(P), "inner", NOT_A_TX, exc=T, id="wus-inner-type"),
    _bad(lambda: om.wus_labels(P, norm_scale="x"), "norm_scale", "x", exc=V, id="wus_labels-norm"),
    # scale_by_lerac and lerac
    *[
        _bad(lambda v=v: om.scale_by_lerac(DEPTH, k=v), "k", v, exc=e, id=f"lerac-k-{v!r}")
        for v, e in [(-1, V), (1.5, T), ("5", T), (True, T)]
    ],
    _bad(lambda: om.scale_by_lerac(DEPTH), "k", exc=T, id="lerac-k-missing-in-paper-mode"),
    *[
        _bad(
            lambda v=v: om.scale_by_lerac(DEPTH, k=2, steps_per_tick=v),
            "steps_per_tick",
            v,
            exc=e,
            id=f"lerac-spt-{v!r}",
        )
        for v, e in [(0, V), (1.5, T)]
    ],
    *[
        _bad(
            lambda v=v, m=m: om.scale_by_lerac(DEPTH, k=4, c=v, mode=m),
            "c",
            v,
            exc=e,
            id=f"lerac-c-{m}-{v}",
        )
        for m, v, e in [
            ("paper", 1.0, V),
            ("paper", 0.0, V),
            ("staircase", 0.5, V),
            ("staircase", math.nan, V),
            ("paper", "10", T),
        ]
    ],
    *[
        _bad(
            lambda a=a, v=v: om.scale_by_lerac(DEPTH, k=2, **{a: v}),
            a,
            v,
            exc=e,
            id=f"lerac-{a}-{v}",
        )
        for a, vs in {
            "decay": [(0.0, V), (1.5, V), (None, T)],
            "min_scale": [(0.0, V), (2.0, V)],
            "head_scale": [(0.0, V), (1.5, V), ("1", T)],
        }.items()
        for v, e in vs
    ],
    _bad(
        lambda: om.scale_by_lerac(DEPTH, k=2, mode="linear"),
        "mode",
        "linear",
        exc=V,
        id="lerac-mode",
    ),
    *[
        _bad(
            lambda v=v: om.scale_by_lerac(DEPTH, k=2, initial_scales=v),
            "initial_scales",
            NO_VALUE,
            exc=e,
            id=f"lerac-init-{i}",
        )
        for i, (v, e) in enumerate(
            [((1.0, 0.0), V), ((0.1, 1.0), V), ((1.0, math.nan), V), ((), V), (("a",), T)]
        )
    ],
    _bad(
        lambda: om.scale_by_lerac(DEPTH, k=1, mode="staircase", initial_scales=(1.0, 1e-3), c=10.0),
        "k",
        1,
        exc=V,
        id="lerac-staircase-k-too-small",
    ),
    _bad(
        lambda: om.scale_by_lerac(DEPTH, k=2, allow_non_monotone="yes"),
        "allow_non_monotone",
        "yes",
        exc=T,
        id="lerac-allow_non_monotone-type",
    ),
    _bad(lambda: om.lerac(NOT_A_TX, DEPTH, k=2), "inner", NOT_A_TX, exc=T, id="lerac-base"),
    _bad(lambda: om.lerac(SGD, DEPTH, k=-1), "k", -1, exc=V, id="lerac-wrapper-k"),
    _bad(lambda: om.lerac_schedules(0.1, 0, k=2), "num_depths", 0, exc=V, id="lerac_schedules-n"),
    _bad(
        lambda: om.lerac_schedules(0.1, None, k=2),
        "num_depths",
        NO_VALUE,
        exc=T,
        id="lerac_sched-none",
    ),
    _bad(
        lambda: om.lerac_schedules(0.1, 2.0, k=2), "num_depths", 2.0, exc=T, id="lerac_sched-float"
    ),
    # two_regimes and its preset
    _bad(
        lambda: om.two_regimes(NOT_A_TX, SGD, switch_step=1),
        "large_tx",
        NOT_A_TX,
        exc=T,
        id="tr-large",
    ),
    _bad(lambda: om.two_regimes(SGD, 1, switch_step=1), "small_tx", 1, exc=T, id="tr-small"),
    _bad(lambda: om.two_regimes(SGD, SGD), "switch_step", NO_VALUE, exc=V, id="tr-no-trigger"),
    *[
        _bad(
            lambda v=v: om.two_regimes(SGD, SGD, switch_step=v),
            "switch_step",
            v,
            exc=e,
            id=f"tr-step-{v!r}",
        )
        for v, e in [(-1, V), (True, T), (1.5, T), ("3", T)]
    ],
    _bad(lambda: om.two_regimes(SGD, SGD, plateau="x"), "plateau", "x", exc=T, id="tr-plateau"),
    _bad(lambda: om.two_regimes(SGD, SGD, signal="yes"), "signal", "yes", exc=T, id="tr-signal"),
    _bad(
        lambda: om.two_regimes(SGD, SGD, switch_step=1, reinit_small_at_switch=1),
        "reinit_small_at_switch",
        1,
        exc=T,
        id="tr-reinit",
    ),
    *[
        _bad(
            lambda v=v: om.two_regimes_sgd(v, total_steps=10),
            "learning_rate",
            v,
            exc=e,
            id=f"tr_sgd-lr-{v!r}",
        )
        for v, e in [(0.0, V), (-1.0, V), (math.nan, V), ("0.1", T)]
    ],
    *[
        _bad(
            lambda v=v: om.two_regimes_sgd(0.1, total_steps=v),
            "total_steps",
            v,
            exc=e,
            id=f"tr_sgd-T-{v!r}",
        )
        for v, e in [(0, V), (1.5, T), (None, T)]
    ],
    *[
        _bad(
            lambda v=v: om.two_regimes_sgd(0.1, total_steps=10, large_fraction=v),
            "large_fraction",
            v,
            exc=V,
            id=f"tr_sgd-f-{v!r}",
        )
        for v in (0.0, 1.5, math.nan)
    ],
    _bad(
        lambda: om.two_regimes_sgd(0.1, total_steps=10, weight_decay=-1.0),
        "weight_decay",
        -1.0,
        exc=V,
        id="tr_sgd-wd",
    ),
    _bad(
        lambda: om.two_regimes_sgd(0.1, total_steps=10, small_tx="adam"),
        "small_tx",
        "adam",
        exc=T,
        id="tr_sgd-small",
    ),
    *[
        _bad(lambda a=a, v=v: om.PlateauTrigger(**{a: v}), a, v, exc=e, id=f"plateau-{a}-{v!r}")
        for a, vs in {
            "patience": [(0, V), (1.5, T)],
            "accumulation_size": [(0, V)],
            "rtol": [(-0.1, V), (1.5, V), (math.nan, V)],
            "atol": [(-1.0, V)],
            "min_large_steps": [(-1, V), (1.5, T)],
        }.items()
        for v, e in vs
    ],
    _bad(
        lambda: om.PlateauTrigger(rtol=0.0, atol=0.0), "rtol", NO_VALUE, exc=V, id="plateau-both-0"
    ),
    _bad(
        lambda: om.PlateauTrigger(min_large_steps=5, max_large_steps=1),
        "max_large_steps",
        1,
        exc=V,
        id="plateau-max-below-min",
    ),
    # growth
    *[
        _bad(lambda v=v: om.growth_lr_adaptation(v), "num_stages", v, exc=e, id=f"lra-S-{v!r}")
        for v, e in [(0, V), (1.5, T), ("2", T), (True, T), (None, T)]
    ],
    *[
        _bad(
            lambda a=a, v=v: om.growth_lr_adaptation(2, **{a: v}),
            a,
            v,
            exc=e,
            id=f"lra-{a}-{v!r}",
        )
        for a, vs in {
            "refresh": [("x", V)],
            "scope": [("x", V)],
            "apply_to": [("x", V)],
            "eps": [(0.0, V), (-1.0, V), (math.nan, V), ("1e-12", T)],
            "clip": [((0.0, 1.0), V), ((2.0, 1.0), V), ("x", T), ((1.0, 2.0, 3.0), T)],
        }.items()
        for v, e in vs
    ],
    _bad(
        lambda: om.growth_lr_adaptation(2, apply_to="all", scope="per_layer"),
        "apply_to",
        "all",
        exc=V,
        id="lra-all-per-layer",
    ),
    *[
        _bad(
            lambda a=a, v=v: om.GrowthSchedule(**{"final_widths": (8,), "total_epochs": 20, a: v}),
            a,
            v,
            exc=e,
            id=f"schedule-{a}-{v!r}",
        )
        for a, vs in {
            "final_widths": [((), V), ((0,), V), ((1.5,), T), (8, T), ((True,), T)],
            "total_epochs": [(0, V), (2.5, T)],
            "m0": [(0.0, V), (1.5, V), ("0.5", T)],
            "p_c": [(0.0, V), (-1.0, V)],
            "t0": [(0, V), (1.5, T)],
            "p_t": [(-1.0, V), ("1", T)],
            "even": [(1, T)],
        }.items()
        for v, e in vs
    ],
    _bad(
        lambda: om.GrowthSchedule((16,), total_epochs=3, m0=0.25, p_c=0.5, t0=2),
        "total_epochs",
        3,
        exc=V,
        id="schedule-overflow",
    ),
    # labels and the phase protocol
    _bad(lambda: om.rule_labels(P, {}), "rules", {}, id="rule_labels-empty"),
    _bad(
        lambda: om.rule_labels(P, {"fast": "^nothing/"}, default="slow"),
        "^nothing/",
        id="rule-none",
    ),
    _bad(lambda: om.rule_labels(P, {"fast": "("}, default="slow"), "(", id="rule-bad-regex"),
    _bad(
        lambda: om.rule_labels(P, {"fast": 3}, default="slow"),
        "rules",
        3,
        id="rule-type",
    ),
    _bad(lambda: om.rule_labels(P, {"fast": [3]}, default="s"), "rules", 3, id="rule-type-in-list"),
    _bad(
        lambda: om.rule_labels(P, {"a": "kernel", "b": "head"}, default="s"),
        "head/kernel",
        id="rule-two",
    ),
    _bad(lambda: om.rule_labels(P, {"fast": "^head/"}), "Dense_0/bias", id="rule-unmatched"),
    *[
        _bad(lambda v=v: om.random_labels(P, v, seed=0), "fraction", v, id=f"random_labels-{v!r}")
        for v in (0.0, 1.0, 1.5, "0.5")
    ],
    # names the rule (as a rule_labels rule "of label True", not as eligible=)
    _bad(lambda: om.random_labels(P, 0.5, seed=0, eligible="^no/"), "^no/", id="random-elig"),
    _bad(lambda: om.weight_bias_labels(P, norm_scale="x"), "norm_scale", "x", id="wb-norm"),
    _bad(
        lambda: om.depth_labels(MLP((3,), 2), P, jnp.zeros((1, 2)), unit_level=0),
        "unit_level",
        0,
        id="depth-unit-level",
    ),
    _bad(
        lambda: om.phase_tag(P, WB, {1: {"weight"}}), "reads", NO_VALUE, exc=V, id="phase_tag-reads"
    ),
    _bad(lambda: om.phase_tag(P, WB, [{"weight"}]), "reads", exc=T, id="phase_tag-reads-type"),
    _bad(lambda: om.phase_tag(P, WB, {0: {"weight"}}, phase=1), "phase", 1, exc=V, id="tag-ph"),
    _bad(
        lambda: om.PhasedStep(lambda p: 0.0, SGD, dispatch="x"), "dispatch", "x", id="step-dispatch"
    ),
    _bad(lambda: om.PhasedStep(3, SGD), "loss_fn", 3, id="step-loss"),
    _bad(lambda: om.PhasedStep(lambda p: 0.0, NOT_A_TX), "tx", id="step-tx"),
    _bad(
        lambda: om.make_train_step(MLP((3,), 2), SGD, dispatch="x"), "dispatch", "x", id="ts-disp"
    ),
    _bad(
        lambda: om.make_train_step(MLP((3,), 2), SGD, extra_args_fn=3),
        "extra_args_fn",
        3,
        id="ts-x",
    ),
    _bad(lambda: widths((4, 8), 0.0), "multiplier", 0.0, exc=V, id="widths-multiplier"),
    _bad(lambda: widths((4, 8), "2"), "multiplier", "2", exc=T, id="widths-multiplier-str"),
    _bad(lambda: widths((4, 8.0), 2), "base", NO_VALUE, exc=T, id="widths-base-float"),
    *[
        _bad(
            lambda v=v: MLP(v, 2).init(jax.random.PRNGKey(0), jnp.zeros((1, 2))),
            "features",
            NO_VALUE,
            exc=e,
            id=f"mlp-features-{v!r}",
        )
        for v, e in [((0,), V), ((2.0,), T), ((True,), T)]
    ],
]


@pytest.mark.parametrize("build,arg,value,exc", CONSTRUCTOR_CASES)
def test_bad_constructor_argument(build, arg, value, exc):
    with pytest.raises(exc) as info:
        build()
    _assert_ours(info, arg, value)


# ------------------------------------------------------------------------------ at init


def _rule_fast(params: Any) -> Any:
    """Callable labels whose rule matches nothing (a typo in the head's name)."""
    return om.rule_labels(params, {"fast": "^nohead/"}, default="slow")


INIT_CASES = [
    # label trees that do not match the params: the message names the path
    *[
        _bad(_init(lambda f=f, lab=lab: f(lab)), path, exc=V, id=f"{name}-{kind}")
        for name, f, lab_ok in [
            ("freeze", lambda lab: om.freeze_schedule(SGD, lab, {"body": (0, 1)}), FZ),
            ("multirate", lambda lab: om.multirate(SGD, SGD, 2, lab), MR),
            ("multirate_sgd", lambda lab: om.multirate_sgd(0.1, 2, lab), MR),
            ("wus", lambda lab: om.wus(SGD, lab), WB),
            ("scale_by_lerac", lambda lab: om.scale_by_lerac(lab, k=2), DEPTH),
            ("lerac", lambda lab: om.lerac(SGD, lab, k=2), DEPTH),
        ]
        for kind, lab, path in [
            ("missing", {"Dense_0": lab_ok["Dense_0"]}, "head/"),
            ("stray", dict(lab_ok, extra={"kernel": lab_ok["head"]["kernel"]}), "extra/kernel"),
        ]
    ],
    _bad(
        _init(
            lambda: om.multirate_subgroups(
                0.1, 2, param_labels={"Dense_0": {"bias": "fast", "kernel": "random"}}
            )
        ),
        "head/",
        exc=V,
        id="subgroups-missing",
    ),
    # a label rule (callable labels) that matches nothing fails at init, naming the rule
    *[
        _bad(_init(f), "^nohead/", exc=V, id=f"{name}-rule-matches-nothing")
        for name, f in [
            ("freeze", lambda: om.freeze_schedule(SGD, _rule_fast, {"fast": (0, 1)})),
            ("multirate", lambda: om.multirate(SGD, SGD, 2, _rule_fast)),
            ("multirate_sgd", lambda: om.multirate_sgd(0.1, 2, _rule_fast)),
            ("subgroups", lambda: om.multirate_subgroups(0.1, 2, param_labels=_rule_fast)),
        ]
    ],
    # labels that are not allowed, or a required label that labels nothing
    _bad(
        _init(lambda: om.freeze_schedule(SGD, FZ, {"neck": (0, 1)})),
        "neck",
        exc=V,
        id="freeze-label-none",
    ),
    _bad(
        _init(lambda: om.multirate(SGD, SGD, 2, {**MR, "head": {"bias": "fast", "kernel": "x"}})),
        "head/kernel",
        exc=V,
        id="multirate-label-not-allowed",
    ),
    _bad(
        _init(
            lambda: om.multirate(SGD, SGD, 2, {m: {"bias": "fast", "kernel": "fast"} for m in P})
        ),
        "slow",
        exc=V,
        id="multirate-no-slow",
    ),
    _bad(
        _init(
            lambda: om.multirate(SGD, SGD, 2, {m: {"bias": "slow", "kernel": "slow"} for m in P})
        ),
        "fast",
        exc=V,
        id="multirate-no-fast",
    ),
    _bad(
        _init(
            lambda: om.multirate_subgroups(
                0.1, 2, param_labels={m: {"bias": "fast", "kernel": "slow"} for m in P}
            )
        ),
        "param_labels",
        exc=V,
        id="subgroups-label-not-allowed",
    ),
    _bad(
        _init(
            lambda: om.multirate_subgroups(
                0.1, 2, param_labels={m: {"bias": "fast", "kernel": "fast"} for m in P}
            )
        ),
        "random",
        exc=V,
        id="subgroups-no-random",
    ),
    _bad(
        _init(lambda: om.wus(SGD, {**WB, "head": {"bias": "bias", "kernel": "x"}})),
        "head/kernel",
        exc=V,
        id="wus-label",
    ),
    _bad(
        _init(lambda: om.wus(SGD, {m: {"bias": "weight", "kernel": "weight"} for m in P})),
        "bias",
        exc=V,
        id="wus-no-bias",
    ),
    _bad(
        _init(lambda: om.wus(SGD, {m: {"bias": "bias", "kernel": "bias"} for m in P})),
        "keep",
        exc=V,
        id="wus-no-weight",
    ),
    _bad(
        _init(lambda: om.scale_by_lerac({**DEPTH, "head": {"bias": 1, "kernel": "a"}}, k=2)),
        "head/kernel",
        exc=T,
        id="lerac-str",
    ),
    _bad(
        _init(lambda: om.scale_by_lerac({**DEPTH, "head": {"bias": 1, "kernel": -1}}, k=2)),
        "head/kernel",
        exc=V,
        id="lerac-neg",
    ),
    _bad(
        _init(lambda: om.scale_by_lerac({**DEPTH, "head": {"bias": 2, "kernel": 2}}, k=2)),
        "depth 1",
        exc=V,
        id="lerac-unused",
    ),
    _bad(
        _init(lambda: om.scale_by_lerac(DEPTH, k=2, initial_scales=(1.0,))),
        "initial_scales",
        exc=V,
        id="lerac-len-short",
    ),
    _bad(
        _init(lambda: om.scale_by_lerac(DEPTH, k=2, initial_scales=(1.0, 0.5, 0.1))),
        "initial_scales",
        exc=V,
        id="lerac-len-long",
    ),
]


@pytest.mark.parametrize("build,arg,value,exc", INIT_CASES)
def test_bad_labels_at_init(build, arg, value, exc):
    with pytest.raises(exc) as info:
        build()
    _assert_ours(info, arg, value)


def test_labels_inside_partition_name_the_path():
    """Inside optax.partition the method sees holes; a label tree for the full tree that lacks
    a leaf of the method's part still names that leaf."""
    part = {"Dense_0": {"bias": "rest", "kernel": "rest"}, "head": {"bias": "m", "kernel": "m"}}
    bad = {"Dense_0": MR["Dense_0"], "head": {"bias": "fast"}}  # head/kernel unlabelled
    tx = optax.partition({"m": om.multirate(SGD, SGD, 2, bad), "rest": SGD}, part)
    with pytest.raises(ValueError) as info:
        tx.init(P)
    _assert_ours(info, "head/kernel")


# ------------------------------------------------------------------------------ in update

G = jax.tree.map(jnp.ones_like, P)

UPDATE_CASES = [
    _bad(lambda: _update(om.wus(SGD, WB)), "value", exc=T, id="wus-no-value"),
    _bad(lambda: _update(om.wus(SGD, WB), value=jnp.ones(2)), "value", exc=T, id="wus-value-shape"),
    _bad(
        lambda: _update(om.multirate_timescales(0.1), params=None), "params", exc=V, id="ts-params"
    ),
    _bad(
        lambda: _update(om.growth_lr_adaptation(2), params=None), "params", exc=V, id="lra-params"
    ),
    _bad(
        lambda: _update(om.two_regimes(SGD, SGD, plateau=om.PlateauTrigger())),
        "value",
        exc=T,
        id="tr-plateau-no-value",
    ),
    _bad(
        lambda: _update(om.two_regimes(SGD, SGD, plateau=om.PlateauTrigger()), value=jnp.ones(2)),
        "value",
        exc=T,
        id="tr-value-shape",
    ),
    _bad(
        lambda: _update(om.two_regimes(SGD, SGD, signal=True)), "switch", exc=T, id="tr-no-switch"
    ),
    _bad(
        lambda: _update(om.two_regimes(SGD, SGD, switch_step=1), switch=True),
        "switch",
        exc=T,
        id="tr-switch-without-signal",
    ),
    _bad(
        lambda: _update(om.two_regimes(SGD, SGD, switch_step=1), params=None),
        "params",
        exc=V,
        id="tr-params",
    ),
    _bad(
        lambda: _update(
            om.two_regimes(SGD, optax.chain(SGD, _to_dtype(jnp.bfloat16)), switch_step=1)
        ),
        "small_tx",
        exc=V,
        id="tr-branches-differ",
    ),
]


def _to_dtype(dtype: Any) -> optax.GradientTransformation:
    return optax.stateless(lambda u, p=None: jax.tree.map(lambda x: x.astype(dtype), u))


def _update(tx: optax.GradientTransformation, params: Any = P, **extra: Any) -> Any:
    """One jitted update: the error must come at trace time, from the library."""
    state = tx.init(P)
    return jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(G, state, params)


@pytest.mark.parametrize("build,arg,value,exc", UPDATE_CASES)
def test_bad_update_arguments(build, arg, value, exc):
    with pytest.raises(exc) as info:
        build()
    _assert_ours(info, arg, value)


# ------------------------------------------------------------------------------ integers

# Every factory that takes an integer: ``build(**ints)`` and the good ints, each with the
# argument name its messages use. Python and numpy integers are the same integers; the same
# fault raises the same class in every factory.
INT_FACTORIES: dict[str, tuple[Callable[..., Any], dict[str, tuple[int, str]]]] = {
    "freeze_schedule": (
        lambda start, stop: om.freeze_schedule(SGD, FZ, {"body": (start, stop)}),
        {"start": (1, "frozen"), "stop": (2, "frozen")},
    ),
    "multirate": (lambda k: om.multirate(SGD, SGD, k, MR), {"k": (2, "k")}),
    "multirate_sgd": (lambda k: om.multirate_sgd(0.1, k, MR), {"k": (2, "k")}),
    "multirate_subgroups": (
        lambda k, seed: om.multirate_subgroups(0.1, k, seed=seed),
        {"k": (2, "k"), "seed": (3, "seed")},
    ),
    "multirate_timescales": (
        lambda m0, m1: om.multirate_timescales(0.1, (m0, m1)),
        {"m0": (1, "multipliers"), "m1": (2, "multipliers")},
    ),
    "wus": (
        lambda window, accumulation_size, patience, warmup, max_windows, period: om.wus(
            SGD,
            WB,
            window=window,
            accumulation_size=accumulation_size,
            patience=patience,
            warmup=warmup,
            max_windows=max_windows,
            force_windows=(period,),
        ),
        {
            "window": (1, "window"),
            "accumulation_size": (1, "accumulation_size"),
            "patience": (1, "patience"),
            "warmup": (1, "warmup"),
            "max_windows": (2, "max_windows"),
            "period": (1, "force_windows"),
        },
    ),
    "scale_by_lerac": (
        lambda k, steps_per_tick: optax.chain(
            SGD, om.scale_by_lerac(DEPTH, k=k, steps_per_tick=steps_per_tick)
        ),
        {"k": (2, "k"), "steps_per_tick": (1, "steps_per_tick")},
    ),
    "lerac": (
        lambda k, steps_per_tick: om.lerac(SGD, DEPTH, k=k, steps_per_tick=steps_per_tick),
        {"k": (2, "k"), "steps_per_tick": (1, "steps_per_tick")},
    ),
    "lerac_schedules": (
        lambda num_depths, k: optax.partition(
            {j: optax.sgd(s) for j, s in enumerate(om.lerac_schedules(0.1, num_depths, k=k))},
            DEPTH,
        ),
        {"num_depths": (2, "num_depths"), "k": (2, "k")},
    ),
    "growth_lr_adaptation": (
        lambda num_stages: optax.chain(SGD, om.growth_lr_adaptation(num_stages)),
        {"num_stages": (2, "num_stages")},
    ),
    "two_regimes": (
        lambda switch_step: om.two_regimes(SGD, optax.sgd(0.01), switch_step=switch_step),
        {"switch_step": (1, "switch_step")},
    ),
    "two_regimes_sgd": (
        lambda total_steps: om.two_regimes_sgd(0.1, total_steps=total_steps, large_fraction=0.5),
        {"total_steps": (2, "total_steps")},
    ),
    "PlateauTrigger": (
        lambda patience, accumulation_size, lo, hi: om.two_regimes(
            SGD,
            optax.sgd(0.01),
            plateau=om.PlateauTrigger(
                patience=patience,
                accumulation_size=accumulation_size,
                min_large_steps=lo,
                max_large_steps=hi,
            ),
        ),
        {
            "patience": (1, "patience"),
            "accumulation_size": (1, "accumulation_size"),
            "lo": (1, "min_large_steps"),
            "hi": (2, "max_large_steps"),
        },
    ),
}
OPTIONAL_INTS = {  # None is a valid value of these
    ("freeze_schedule", "stop"),
    ("wus", "max_windows"),
    ("two_regimes", "switch_step"),
    ("PlateauTrigger", "lo"),
    ("PlateauTrigger", "hi"),
}
UNBOUNDED_INTS = {("multirate_subgroups", "seed")}  # any int seeds a PRNG key
INT_FAULTS = {"float": (2.0, T), "bool": (True, T), "str": ("2", T), "none": (None, T)}
INT_FAULTS["negative"] = (-1, V)


def _int_build(name: str, **over: Any) -> Any:
    build, good = INT_FACTORIES[name]
    return build(**{**{a: v for a, (v, _) in good.items()}, **over})


def _three_updates(tx: optax.GradientTransformation) -> list[Any]:
    tx = optax.with_extra_args_support(tx)
    state, out = tx.init(P), []
    for t in range(3):
        g = jax.tree.map(lambda x, t=t: jnp.full_like(x, 1.0 + t), P)
        u, state = tx.update(g, state, P, value=0.5)
        out.append(u)
    return out


@pytest.mark.parametrize("np_int", [np.int32, np.int64, np.uint8])
@pytest.mark.parametrize("name", list(INT_FACTORIES))
def test_numpy_integers_are_integers(name, np_int):
    """Every factory that takes an integer takes a numpy integer too, with the same result."""
    _, good = INT_FACTORIES[name]
    ref = _three_updates(_int_build(name))
    got = _three_updates(_int_build(name, **{a: np_int(v) for a, (v, _) in good.items()}))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


SAME_FAULT_CASES = [
    pytest.param(name, arg, fault, id=f"{name}-{arg}-{fault}")
    for name, (_, good) in INT_FACTORIES.items()
    for arg in good
    for fault in INT_FAULTS
    if not (fault == "none" and (name, arg) in OPTIONAL_INTS)
    and not (fault == "negative" and (name, arg) in UNBOUNDED_INTS)
]


@pytest.mark.parametrize("name,arg,fault", SAME_FAULT_CASES)
def test_same_integer_fault_same_class_in_every_factory(name, arg, fault):
    """A float, bool, string or None for an integer is a TypeError, a negative one a
    ValueError, in every factory; the message names the argument and quotes the value."""
    value, exc = INT_FAULTS[fault]
    with pytest.raises(Exception) as info:
        _int_build(name, **{arg: value}).init(P)
    assert type(info.value) is exc, f"{name}({arg}={value!r}): {info.value!r}"
    _assert_ours(info, INT_FACTORIES[name][1][arg][1], value)


def test_grow_refuses_bad_arguments():
    """grow: each bad option names itself (TypeError for a wrong type, ValueError out of
    range); bad plans name the layer."""
    small, big = MLP((2,), 2), MLP((4,), 2)
    x = jnp.zeros((1, 3))
    v = small.init(jax.random.PRNGKey(0), x)
    shapes = jax.eval_shape(lambda: big.init(jax.random.PRNGKey(0), x))
    key = jax.random.PRNGKey(1)
    sgd_state = SGD.init(v["params"])
    cases = [
        (dict(stage=-1), "stage", -1, V),
        (dict(stage=0.0), "stage", 0.0, T),
        (dict(key=None), "key", None, T),
        (dict(key="k"), "key", "k", T),
        (dict(rescale="x"), "rescale", "x", V),
        (dict(new_init="x"), "new_init", "x", V),
        (dict(momentum="x"), "momentum", "x", V),
        (dict(exact="yes"), "exact", "yes", T),
        (dict(pairing=None), "pairing", None, T),
        (dict(head_exponent=0.0), "head_exponent", 0.0, V),
        (dict(pair_noise=-1.0), "pair_noise", -1.0, V),
        (dict(pair_noise="x"), "pair_noise", "x", T),
        (dict(bn_epsilon=-1.0), "bn_epsilon", -1.0, V),
        (dict(num_stages=0), "num_stages", 0, V),
        (dict(num_stages=2.0), "num_stages", 2.0, T),
        (dict(opt_state=sgd_state), "optimizer", NO_VALUE, V),
        (dict(opt_state=sgd_state, optimizer=optax.sgd), "optimizer", NO_VALUE, T),
        (dict(num_stages=1), "stage", NO_VALUE, V),
        (
            dict(next_shapes=jax.eval_shape(lambda: MLP((1,), 2).init(key, x))),
            "Dense_0",
            NO_VALUE,
            V,
        ),
        (dict(next_shapes=jax.eval_shape(lambda: small.init(key, x))), "next_shapes", NO_VALUE, V),
        (dict(next_shapes=jax.eval_shape(lambda: MLP((3,), 2).init(key, x))), "odd", NO_VALUE, V),
        (dict(next_shapes=[shapes]), "next_shapes", NO_VALUE, T),
        (dict(variables=[v]), "variables", NO_VALUE, T),
        (dict(variables={"batch_stats": {}}), "params", NO_VALUE, V),
    ]
    for over, arg, value, exc in cases:
        kw = dict(variables=v, opt_state=None, stage=0, key=key, next_shapes=shapes)
        kw.update(over)
        with pytest.raises(Exception) as info:
            om.grow(kw.pop("variables"), kw.pop("opt_state"), kw.pop("stage"), **kw)
        assert type(info.value) is exc, f"grow({over}): {info.value!r}"
        _assert_ours(info, arg, value)


def test_growing_takes_numpy_integers():
    """GrowthSchedule and grow take numpy integers as the Python ints they are."""
    ref = om.GrowthSchedule((8, 16), total_epochs=10, m0=0.5, p_c=1.0, t0=2)
    got = om.GrowthSchedule(
        np.array([8, 16]), total_epochs=np.int32(10), m0=np.float32(0.5), p_c=1, t0=np.int64(2)
    )
    assert (got.widths, got.epochs, got.final_widths) == (ref.widths, ref.epochs, (8, 16))
    small, big = MLP((2,), 2), MLP((4,), 2)
    x = jnp.zeros((1, 3))
    v = small.init(jax.random.PRNGKey(0), x)
    shapes = jax.eval_shape(lambda: big.init(jax.random.PRNGKey(0), x))
    grown = [
        om.grow(v, None, stage, key=jax.random.PRNGKey(1), next_shapes=shapes, num_stages=n)[0]
        for stage, n in ((0, 2), (np.int64(0), np.int32(2)))
    ]
    for a, b in zip(jax.tree.leaves(grown[0]), jax.tree.leaves(grown[1])):
        np.testing.assert_array_equal(a, b)


def test_grow_refuses_an_opt_state_of_another_optimizer():
    small, big = MLP((2,), 2), MLP((4,), 2)
    x = jnp.zeros((1, 3))
    v = small.init(jax.random.PRNGKey(0), x)
    shapes = jax.eval_shape(lambda: big.init(jax.random.PRNGKey(0), x))
    with pytest.raises(ValueError) as info:
        om.grow(v, optax.adam(0.1).init(v["params"]), 0, key=jax.random.PRNGKey(1),
                next_shapes=shapes, optimizer=optax.sgd(0.1, momentum=0.9))  # fmt: skip
    _assert_ours(info, "opt_state")


# ------------------------------------------------------------------------------ train loop, data


def _split(n: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3)).astype(np.float32)
    return Split(x=x, y=(x[:, 0] > 0.5).astype(np.int32))


TRAIN, TEST = _split(32), _split(16, 1)

FIT_CASES = [
    *[
        _bad(lambda a=a, v=v: _fit(**{a: v}), a, v, id=f"fit-{a}-{v!r}")
        for a, vs in {
            "epochs": (-1, 1.5, True),
            "batch_size": (0, 1000),
            "max_steps": (-1,),
            "seed": (-1,),
            "loss": ("mse",),
            "call": (3,),
            "init": (3,),
        }.items()
        for v in vs
    ],
    _bad(lambda: _fit(batch_size=None), "batch_size", None, id="fit-split-without-batch_size"),
    _bad(lambda: _fit(data=[], batch_size=8), "batch_size", 8, id="fit-batch_size-not-split"),
    # a generator can be iterated once only: the message says to pass a callable
    _bad(lambda: _fit(data=iter([]), batch_size=None), "callable", id="fit-one-shot-iterator"),
    _bad(lambda: _fit(data=3, batch_size=None), "data", "int", id="fit-data-type"),
    _bad(lambda: _fit(callbacks=[3]), "Callback", 3, id="fit-callback"),
    _bad(
        lambda: _fit(step=train_lib.make_train_step(MLP((3,), 2), optax.adam(0.1))),
        "step",
        id="fit-step-of-another-tx",
    ),
    _bad(
        lambda: _fit(step=train_lib.make_train_step(MLP((3,), 2), SGD), loss=lambda o, b: 0.0),
        "loss",
        id="fit-step-and-loss",
    ),
    *[
        _bad(lambda a=a, v=v: train_lib.Checkpoint("c", **{a: v}), a, v, id=f"ckpt-{a}-{v!r}")
        for a, v in (("max_to_keep", 1), ("every_steps", 0), ("resume", "yes"))
    ],
    _bad(lambda: train_lib.Evaluate({}, every_epochs=0), "every_epochs", 0, id="eval-every"),
    _bad(lambda: train_lib.Evaluate([TEST]), "splits", id="eval-splits"),
    _bad(lambda: train_lib.UpdateExtras(3), "fn", 3, id="update-extras-fn"),
    _bad(
        lambda: train_lib.evaluate(MLP((3,), 2), *_init_mlp(), _split(0)), "data", id="eval-empty"
    ),
    _bad(
        lambda: train_lib.evaluate(MLP((3,), 2), *_init_mlp(), TEST, batch_size=0),
        "batch_size",
        0,
        id="eval-bs",
    ),
    _bad(lambda: num_batches(TRAIN, 0), "batch_size", 0, id="num_batches-0"),
    _bad(lambda: num_batches(TRAIN, 33), "batch_size", 33, id="num_batches-big"),
    _bad(lambda: list(batches(TRAIN, 4, seed=-1)), "seed", -1, id="batches-seed"),
    _bad(lambda: list(batches(TRAIN, 4, seed=0, epoch=-2)), "epoch", -2, id="batches-epoch"),
    _bad(lambda: validation_split(TRAIN, 0.0), "fraction", 0.0, id="validation-0"),
    _bad(lambda: validation_split(TRAIN, 1.0), "fraction", 1.0, id="validation-1"),
    _bad(lambda: validation_split(TRAIN, 0.001), "fraction", 0.001, id="validation-empty-part"),
    _bad(lambda: filter_classes(TRAIN, []), "classes", [], id="filter-empty"),
    _bad(lambda: filter_classes(TRAIN, [1, 1]), "classes", [1, 1], id="filter-dup"),
    _bad(lambda: Split(x=np.zeros((3, 2)), y=np.zeros(2)), "y", id="split-lengths"),
]


def _init_mlp() -> tuple[Any, Any]:
    return train_lib.init_model(MLP((3,), 2), jax.random.PRNGKey(0), TRAIN.x[:1])


def _fit(**kw: Any) -> train_lib.FitResult:
    args = dict(data=TRAIN, epochs=1, batch_size=8, seed=0)
    args.update(kw)
    return train_lib.fit(MLP((3,), 2), SGD, **args)


@pytest.mark.parametrize("build,arg,value,exc", FIT_CASES)
def test_bad_train_and_data_arguments(build, arg, value, exc):
    with pytest.raises(exc) as info:
        build()
    _assert_ours(info, arg, value)


def test_unknown_data_set_names_the_embedded_ones(tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError) as info:
        load_dataset("no_such_set", data_dir=data_dir)
    _assert_ours(info, "no_such_set")
    for name in ("mnist_subset", "digits", "mnist1d"):
        assert name in str(info.value)
    assert not data_dir.exists() or not any(data_dir.rglob("*")), "a failed load wrote data"


# ------------------------------------------------------------------------------ checkpoints


def _tree_digest(root: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the bytes a failing run must not touch)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_restore_checkpoint_of_another_model_names_the_path(tmp_path):
    p3, _ = train_lib.init_model(MLP((3,), 2), jax.random.PRNGKey(0), TRAIN.x[:1])
    p5, _ = train_lib.init_model(MLP((5,), 2), jax.random.PRNGKey(0), TRAIN.x[:1])
    p33, _ = train_lib.init_model(MLP((3, 3), 2), jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = optax.adam(0.1)
    train_lib.save_checkpoint(tmp_path / "ckpt", {"params": p3, "opt_state": tx.init(p3)})
    before = _tree_digest(tmp_path)
    with pytest.raises(ValueError) as info:  # same structure, other shapes
        train_lib.restore_checkpoint(tmp_path / "ckpt", {"params": p5, "opt_state": tx.init(p5)})
    _assert_ours(info, "params/Dense_0/kernel")
    assert "(3, 3)" in str(info.value) and "(3, 5)" in str(info.value)  # both shapes quoted
    with pytest.raises(ValueError) as info:  # another structure: the missing layer is named
        train_lib.restore_checkpoint(tmp_path / "ckpt", {"params": p33, "opt_state": tx.init(p33)})
    _assert_ours(info, "Dense_1")
    with pytest.raises(ValueError) as info:  # another optimizer
        train_lib.restore_checkpoint(
            tmp_path / "ckpt", {"params": p3, "opt_state": optax.sgd(0.1, 0.9).init(p3)}
        )
    _assert_ours(info, "opt_state")
    assert _tree_digest(tmp_path) == before
    restored = train_lib.restore_checkpoint(
        tmp_path / "ckpt", {"params": p3, "opt_state": tx.init(p3)}
    )
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(p3)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_paths(tmp_path):
    p, _ = _init_mlp()
    with pytest.raises(ValueError) as info:
        train_lib.restore_checkpoint(tmp_path / "nothing", p)
    _assert_ours(info, "nothing")
    train_lib.save_checkpoint(tmp_path / "ckpt", p)
    before = _tree_digest(tmp_path)
    with pytest.raises(ValueError) as info:
        train_lib.save_checkpoint(tmp_path / "ckpt", jax.tree.map(lambda x: x + 1, p))
    _assert_ours(info, "ckpt")
    assert _tree_digest(tmp_path) == before, "a refused save changed the checkpoint"


def test_failing_fit_leaves_earlier_checkpoints_intact(tmp_path):
    ckpt = tmp_path / "ckpts"
    resume = lambda: train_lib.Checkpoint(ckpt, resume=True)  # noqa: E731
    first = _fit(epochs=2, callbacks=[train_lib.Checkpoint(ckpt)])
    steps = sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit())
    assert steps == [4, 8]
    before = _tree_digest(ckpt)

    # a resumed run that fails after its own first epoch: its new checkpoint may be added,
    # the earlier ones stay byte for byte
    class Boom(train_lib.Callback):
        def on_epoch_end(self, loop, row):
            raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        _fit(epochs=4, callbacks=[resume(), Boom()])
    after = _tree_digest(ckpt)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(before) <= set(after)

    # a resumed run of another model refuses the checkpoint, naming the path, and writes nothing
    with pytest.raises(ValueError) as info:
        train_lib.fit(MLP((5,), 2), SGD, TRAIN, epochs=4, batch_size=8, seed=0,
                      callbacks=[resume()])  # fmt: skip
    _assert_ours(info, "Dense_0/kernel")
    assert _tree_digest(ckpt) == after

    # a run refused for a bad argument never touches the directory, nor does one refused for
    # a directory that holds checkpoints without resume=True
    with pytest.raises(ValueError):
        _fit(epochs=4, batch_size=0, callbacks=[resume()])
    with pytest.raises(ValueError) as info:
        _fit(epochs=4, callbacks=[train_lib.Checkpoint(ckpt)])
    _assert_ours(info, "resume=True")
    assert _tree_digest(ckpt) == after
    # and the earlier checkpoints still resume to the uninterrupted result
    resumed = _fit(epochs=2, callbacks=[resume()])
    assert resumed.steps >= first.steps


# ------------------------------------------------------------------------------ results files


def _args(out_dir: pathlib.Path, quick: bool = False) -> argparse.Namespace:
    return harness.parser("battery", "bad-input battery").parse_args(
        ["--out-dir", str(out_dir)] + (["--quick"] if quick else [])
    )


def _write(out_dir: pathlib.Path, *, quick: bool = False, plot=None, summary=None) -> Any:
    return harness.write_results(
        "battery",
        args=_args(out_dir, quick),
        config={"model": "none"},
        runs=[{"arm": "a", "seed": 0, "final_accuracy": 0.5}],
        summary=summary if summary is not None else {"final_accuracy": 0.5},
        claim_md="A claim.",
        table_md="| a |\n|---|\n| 1 |",
        plot=plot,
        argv=["--out-dir", str(out_dir)],
    )


def _line_plot(fig: Any) -> None:
    fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1])


def test_failing_benchmark_run_leaves_results_untouched(tmp_path):
    out = tmp_path / "results"
    _write(out, plot=_line_plot)
    before = _tree_digest(out)
    assert sorted(before) == ["battery.json", "battery.md", "battery.png"]

    def broken_plot(fig):
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        _write(out, plot=broken_plot)
    assert _tree_digest(out) == before, "a failing run changed or left files"
    with pytest.raises(ValueError) as info:  # a summary that is not flat
        _write(out, summary={"nested": {"a": 1}})
    _assert_ours(info, "nested")
    assert _tree_digest(out) == before
    # a quick run writes *.quick.* and never over the full results
    _write(out, quick=True, plot=_line_plot)
    after = _tree_digest(out)
    assert {k: after[k] for k in before} == before
    assert {"battery.quick.json", "battery.quick.md", "battery.quick.png"} <= set(after)
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temporary files were left"


def test_bad_benchmark_flags():
    with pytest.raises(ValueError) as info:
        harness.seeds_from_args(argparse.Namespace(seeds=0, quick=False), full=3)
    _assert_ours(info, "seeds", 0)
    with pytest.raises(ValueError) as info:
        harness.paired_ci([1.0, 2.0], [1.0])
    _assert_ours(info, "a and b")
