"""The common battery: every public transformation of ``optax_multirate`` meets the same bar.

One :class:`Entry` per name in ``optax_multirate.TRANSFORMATIONS`` says how to build the
transformation on a tiny MLP-shaped tree (``Dense_0``, ``Dense_1``, ``head``) in the place it
belongs (wrappers around ``optax.sgd``/``optax.adam``, scalers after them, full optimizers
alone), with its labels, the extra ``update`` arguments it needs, the hyperparameter to inject
and the structural ints that ``optax.inject_hyperparams`` must get as ``static_args``. Every
entry then goes through: chains with sgd and adam (a no-op configuration equals the base
optimizer), ``optax.partition``, ``optax.inject_hyperparams``, ``optax.apply_if_finite``,
``optax.MultiSteps``, stable state shapes and dtypes, bf16 params, jit against no jit, one trace
over 20 jitted steps, an orbax checkpoint at an awkward moment that resumes bitwise, and
hypothesis property tests with one invariant of each method's spec.

"No jit" runs under ``jax.disable_jit()`` (every op eager, ``lax.cond`` as a Python branch).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_multirate as om
from optax_multirate import train as train_lib
from optax_multirate.growing import GrowthLRAState
from optax_multirate.models import MLP

PROPERTY_SETTINGS = settings(max_examples=15, deadline=None, database=None, derandomize=True)

# ------------------------------------------------------------------------------ the tiny tree

MODULES = ("Dense_0", "Dense_1", "head")
SUB = ("Dense_1", "head")  # the method's part of the tree inside optax.partition
SHAPES = {"Dense_0": (3, 4), "Dense_1": (4, 4), "head": (4, 2)}  # MLP((4, 4), 2) on 3 inputs


def _params(dtype: Any = jnp.float32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        m: {
            "bias": jnp.asarray(0.1 * rng.normal(size=s[1:]), dtype),
            "kernel": jnp.asarray(0.5 * rng.normal(size=s), dtype),
        }
        for m, s in SHAPES.items()
    }


def _grads(params: Any, t: int, seed: int = 1, scale: float = 1.0) -> Any:
    """Gradient of step ``t``: deterministic normal noise shaped like ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng([seed, t])
    return jax.tree.unflatten(
        treedef,
        [jnp.asarray(scale * rng.normal(size=np.shape(x)), jnp.asarray(x).dtype) for x in leaves],
    )


def _per_module(fn: Callable[[str, str], Any], modules=MODULES) -> dict:
    return {m: {"bias": fn(m, "bias"), "kernel": fn(m, "kernel")} for m in modules}


def _sub(tree: dict) -> dict:
    return {m: tree[m] for m in SUB}


FREEZE_LABELS = _per_module(lambda m, leaf: "head" if m == "head" else "body")
MR_LABELS = _per_module(lambda m, leaf: "fast" if m == "head" else "slow")
WB_LABELS = _per_module(lambda m, leaf: "bias" if leaf == "bias" else "weight")
DEPTH = _per_module(lambda m, leaf: MODULES.index(m))
DEPTH_SUB = _per_module(lambda m, leaf: SUB.index(m), SUB)
SCALES = (1.0, 0.1, 0.01)
PART_LABELS = _per_module(lambda m, leaf: "method" if m in SUB else "rest")


def _lab(tree: dict, scope: str) -> dict:
    return tree if scope == "full" else _sub(tree)


BASES: dict[str, Callable[[], optax.GradientTransformation]] = {
    "sgd": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
}
OTHER = {"sgd": "adam", "adam": "sgd"}


def _value(t: int) -> dict:
    """WUS's signal: an accuracy-like value that changes by >= 0.1 a step (never flat)."""
    return {"value": jnp.float32(0.5 + 0.1 * (t % 3))}


def _no_extra(t: int) -> dict:
    return {}


# ------------------------------------------------------------------------------ the entries


def _freeze_sgd(learning_rate, param_labels, frozen):
    """``freeze_schedule`` has no numeric hyperparameter: inject its inner optimizer's rate."""
    return om.freeze_schedule(optax.sgd(learning_rate, momentum=0.9), param_labels, frozen)


def _multirate_sgd_pair(learning_rate, k, param_labels):
    """``multirate`` has no numeric hyperparameter: inject the fast rate of its optimizers."""
    return om.multirate(optax.sgd(learning_rate), optax.sgd(k * learning_rate), k, param_labels)


@dataclasses.dataclass(frozen=True)
class Inject:
    """How an entry goes under ``optax.inject_hyperparams``.

    Attributes:
      factory: the factory re-called with traced numeric arguments (the public one, or a
        two-line wrapper when the public one has no numeric hyperparameter of its own).
      kwargs: ``base -> kwargs`` of the factory.
      static: structural arguments that must be ``static_args`` (ints that shape the state or
        the phases); label trees, tuples, strings and bools are static on their own.
      hp: the numeric hyperparameter changed through ``state.hyperparams``.
      new: its new value (one that changes the updates within a few steps).
      scaler: the injected transformation goes after the base optimizer in a chain.
    """

    factory: Callable[..., Any]
    kwargs: Callable[[str], dict]
    static: tuple[str, ...]
    hp: str
    new: float
    scaler: bool = False


@dataclasses.dataclass(frozen=True)
class Entry:
    """One public transformation, as the battery builds and drives it.

    Attributes:
      name: the name in ``optax_multirate.TRANSFORMATIONS``.
      role: ``"wrapper"`` (wraps the base optimizer), ``"scaler"`` (chained after it) or
        ``"optimizer"`` (a full optimizer: alone, or after ``optax.identity()``).
      make: ``(base, scope) -> tx``; ``scope="full"`` labels the whole tree, ``"sub"`` only
        ``SUB`` (the reference of the partition test).
      noop: ``base -> tx`` in a configuration that must equal the base optimizer alone.
      extra: extra ``update`` keyword arguments of step ``t``.
      inject: see :class:`Inject`.
      moment: steps before the checkpoint, and a check that the state is at the awkward moment.
      prepare: sets up a state after ``init`` (growth: elements born in stage 1).
      uses_base: whether ``make`` uses its base (a full optimizer without a slot for one
        does not: the chain test runs it once).
    """

    name: str
    role: str
    make: Callable[[str, str], optax.GradientTransformation]
    noop: Callable[[str], optax.GradientTransformation] | None
    inject: Inject
    moment: tuple[int, Callable[[Any], bool]]
    extra: Callable[[int], dict] = _no_extra
    prepare: Callable[[Any], Any] | None = None
    uses_base: bool = True


def _find(state: Any, cls: type) -> Any:
    """The one ``cls`` state (a NamedTuple, found by its class name as optax does) in ``state``."""
    found = optax.tree_utils.tree_get_all_with_path(
        state, cls.__name__, filtering=lambda _, v: isinstance(v, cls)
    )
    assert len(found) == 1, f"expected one {cls.__name__}, found {len(found)}"
    return found[0][1]


def _born_in_stage_1(state: Any) -> Any:
    """Marks the second half of every kernel's output columns as born in stage 1."""

    def births(b: GrowthLRAState) -> GrowthLRAState:
        def leaf(path, x):
            if om.labels.path_str(path).endswith("kernel"):
                cols = np.arange(x.shape[-1]) >= x.shape[-1] // 2
                return jnp.asarray(np.broadcast_to(cols, x.shape), x.dtype)
            return x

        return b._replace(birth=jax.tree_util.tree_map_with_path(leaf, b.birth))

    is_lra = lambda x: isinstance(x, GrowthLRAState)
    return jax.tree.map(lambda x: births(x) if is_lra(x) else x, state, is_leaf=is_lra)


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry(
            name="freeze_schedule",
            role="wrapper",
            make=lambda b, sc: om.freeze_schedule(
                BASES[b](), _lab(FREEZE_LABELS, sc), {"body": (1, 4)}
            ),
            noop=lambda b: om.freeze_schedule(BASES[b](), FREEZE_LABELS, {"body": (100, None)}),
            inject=Inject(
                _freeze_sgd,
                lambda b: dict(
                    learning_rate=0.05, param_labels=FREEZE_LABELS, frozen={"body": (1, 4)}
                ),
                (),
                "learning_rate",
                0.5,
            ),
            # mid-freeze: the body is frozen on steps 1..3
            moment=(2, lambda s: int(_find(s, om.FreezeScheduleState).tag.phase) == 1),
        ),
        Entry(
            name="multirate",
            role="wrapper",
            make=lambda b, sc: om.multirate(BASES[b](), BASES[b](), 3, _lab(MR_LABELS, sc)),
            noop=lambda b: om.multirate(BASES[b](), BASES[b](), 1, MR_LABELS),
            inject=Inject(
                _multirate_sgd_pair,
                lambda b: dict(learning_rate=0.05, k=3, param_labels=MR_LABELS),
                ("k",),
                "learning_rate",
                0.5,
            ),
            # mid-cycle: one step after a cycle start, with a held slow update
            moment=(4, lambda s: int(_find(s, om.MultirateState).count) % 3 == 1),
        ),
        Entry(
            name="multirate_sgd",
            role="optimizer",
            uses_base=False,
            make=lambda b, sc: om.multirate_sgd(0.05, 3, _lab(MR_LABELS, sc), momentum=0.9),
            noop=lambda b: om.multirate_sgd(0.05, 1, MR_LABELS, momentum=0.9),  # = BASES["sgd"]
            inject=Inject(
                om.multirate_sgd,
                lambda b: dict(learning_rate=0.05, k=3, param_labels=MR_LABELS, momentum=0.9),
                ("k",),
                "learning_rate",
                0.5,
            ),
            moment=(4, lambda s: int(_find(s, om.MultirateState).count) % 3 == 1),
        ),
        Entry(
            name="multirate_subgroups",
            role="optimizer",
            uses_base=False,
            make=lambda b, sc: om.multirate_subgroups(0.05, 2, 0.5, seed=0, momentum=0.9),
            noop=None,
            inject=Inject(
                om.multirate_subgroups,
                lambda b: dict(learning_rate=0.05, k=2, slow_fraction=0.5, seed=0),
                ("k", "seed"),
                "learning_rate",
                0.5,
            ),
            # mid-cycle (cycle of k + 1 = 3 steps), with a mask drawn
            moment=(4, lambda s: int(_find(s, om.MultirateSubgroupsState).count) % 3 == 1),
        ),
        Entry(
            name="multirate_timescales",
            role="optimizer",
            uses_base=False,
            make=lambda b, sc: om.multirate_timescales(0.05, (1, 3), momentum=0.9),
            noop=None,
            inject=Inject(
                om.multirate_timescales,
                lambda b: dict(learning_rate=0.05, multipliers=(1, 3), momentum=0.9),
                (),
                "learning_rate",
                0.5,
            ),
            # mid-cycle of the slow brain (it started at step 3 and meets brain 0 after step 5)
            moment=(4, lambda s: int(_find(s, om.MultirateTimescalesState).count) % 3 == 1),
        ),
        Entry(
            name="wus",
            role="wrapper",
            make=lambda b, sc: om.wus(
                BASES[b](), _lab(WB_LABELS, sc), window=2, warmup=1, force_windows=(2,)
            ),
            noop=lambda b: om.wus(BASES[b](), WB_LABELS, threshold=0.0),
            extra=_value,
            inject=Inject(
                om.wus,
                lambda b: dict(inner=BASES[b](), param_labels=WB_LABELS, window=1, warmup=1),
                ("window", "accumulation_size", "patience", "warmup"),
                "threshold",
                10.0,  # every period is flat: a window opens at the next judgement
            ),
            # mid-window: the forced window of 2 periods opened after step 1, one period left
            moment=(3, lambda s: int(_find(s, om.WusState).skip_left) == 1),
        ),
        Entry(
            name="scale_by_lerac",
            role="scaler",
            make=lambda b, sc: optax.chain(
                BASES[b](),
                om.scale_by_lerac(
                    DEPTH if sc == "full" else DEPTH_SUB,
                    k=5,
                    initial_scales=SCALES if sc == "full" else SCALES[1:],
                ),
            ),
            noop=lambda b: optax.chain(BASES[b](), om.scale_by_lerac(DEPTH, k=0)),
            inject=Inject(
                om.scale_by_lerac,
                lambda b: dict(param_labels=DEPTH, k=5, decay=0.1),
                ("k", "steps_per_tick"),
                "decay",
                0.5,
                scaler=True,
            ),
            moment=(2, lambda s: int(_find(s, om.LeracState).count) == 2),  # mid-curriculum
        ),
        Entry(
            name="lerac",
            role="wrapper",
            make=lambda b, sc: om.lerac(
                BASES[b](),
                DEPTH if sc == "full" else DEPTH_SUB,
                k=5,
                initial_scales=SCALES if sc == "full" else SCALES[1:],
            ),
            noop=lambda b: om.lerac(BASES[b](), DEPTH, k=0),
            inject=Inject(
                om.lerac,
                lambda b: dict(inner=BASES[b](), param_labels=DEPTH, k=5, decay=0.1),
                ("k", "steps_per_tick"),
                "decay",
                0.5,
            ),
            moment=(2, lambda s: int(_find(s, om.LeracState).count) == 2),
        ),
        Entry(
            name="two_regimes",
            role="wrapper",
            make=lambda b, sc: om.two_regimes(BASES[b](), BASES[OTHER[b]](), switch_step=3),
            noop=lambda b: om.two_regimes(BASES[b](), BASES[OTHER[b]](), switch_step=1000),
            inject=Inject(
                om.two_regimes,
                lambda b: dict(large_tx=BASES[b](), small_tx=BASES[OTHER[b]](), switch_step=100),
                (),
                "switch_step",  # documented as injectable
                0,
            ),
            # right at the switch: 3 large steps done, the next call is the first small one
            moment=(
                3,
                lambda s: (
                    int(_find(s, om.TwoRegimesState).phase) == 0
                    and int(_find(s, om.TwoRegimesState).count) == 3
                ),
            ),
        ),
        Entry(
            name="two_regimes_sgd",
            role="optimizer",
            make=lambda b, sc: om.two_regimes_sgd(
                0.1, total_steps=8, large_fraction=0.5, small_tx=BASES[b]()
            ),
            # switch_step = round(1e-4 * 1000) = 0: the small-step optimizer from the start
            noop=lambda b: om.two_regimes_sgd(
                0.1, total_steps=1000, large_fraction=1e-4, small_tx=BASES[b]()
            ),
            inject=Inject(
                om.two_regimes_sgd,
                lambda b: dict(learning_rate=0.1, total_steps=8, large_fraction=0.5),
                ("total_steps", "large_fraction"),
                "learning_rate",
                1.0,
            ),
            moment=(
                4,
                lambda s: (
                    int(_find(s, om.TwoRegimesState).phase) == 0
                    and int(_find(s, om.TwoRegimesState).count) == 4
                ),
            ),
        ),
        Entry(
            name="growth_lr_adaptation",
            role="scaler",
            # ratios frozen per stage: the resumed run must honour the restored lra_stale flag
            make=lambda b, sc: optax.chain(BASES[b](), om.growth_lr_adaptation(2, refresh="stage")),
            # all elements born in stage 0: every ratio is N_0 / N_0 = 1
            noop=lambda b: optax.chain(BASES[b](), om.growth_lr_adaptation(2)),
            inject=Inject(
                om.growth_lr_adaptation,
                lambda b: dict(num_stages=2, eps=1e-12),
                ("num_stages",),
                "eps",
                1e6,  # a floor above N_0**2 changes every ratio
                scaler=True,
            ),
            # between growth stages: see test_checkpoint_resumes_bitwise (a real grow)
            moment=(3, lambda s: bool(_find(s, GrowthLRAState).lra_stale)),
            prepare=_born_in_stage_1,
        ),
    ]
}

NAMES = list(ENTRIES)


# ------------------------------------------------------------------------------ helpers


def _init(entry: Entry, tx: optax.GradientTransformation, params: Any) -> Any:
    state = tx.init(params)
    return entry.prepare(state) if entry.prepare is not None else state


def _run(
    entry: Entry,
    tx: optax.GradientTransformation,
    params: Any,
    steps: int,
    *,
    state: Any = None,
    start: int = 0,
    update: Callable[..., Any] | None = None,
    grads: Callable[[Any, int], Any] = _grads,
) -> tuple[Any, Any, list[Any], list[Any]]:
    """Runs ``steps`` updates from step ``start``; returns params, state, updates, states."""
    update = tx.update if update is None else update
    state = _init(entry, tx, params) if state is None else state
    updates, states = [], []
    for t in range(start, start + steps):
        u, state = update(grads(params, t), state, params, **entry.extra(t))
        params = optax.apply_updates(params, u)
        updates.append(u)
        states.append(state)
    return params, state, updates, states


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with jit disabled: every op eager, ``lax.cond`` as a Python branch."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.disable_jit():
            return fn(*args, **kwargs)

    return call


def _counting_jit(tx: optax.GradientTransformation) -> tuple[Callable[..., Any], list[int]]:
    """``jax.jit(tx.update)`` with a Python counter of its traces."""
    traces = [0]

    def update(g, s, p, extra):
        traces[0] += 1
        return tx.update(g, s, p, **extra)

    jitted = jax.jit(update)
    return (lambda g, s, p, **extra: jitted(g, s, p, extra)), traces


_JITTED: dict[tuple[str, str], tuple[optax.GradientTransformation, Callable, list[int]]] = {}


def _jitted(
    name: str, base: str = "sgd"
) -> tuple[optax.GradientTransformation, Callable, list[int]]:
    """The entry's main transformation and its jitted update, compiled once per module."""
    key = (name, base)
    if key not in _JITTED:
        tx = ENTRIES[name].make(base, "full")
        _JITTED[key] = (tx, *_counting_jit(tx))
    return _JITTED[key]


def _assert_close(a: Any, b: Any, rtol: float = 1e-6, atol: float = 1e-7, what: str = "") -> None:
    chex.assert_trees_all_equal_structs(a, b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what} at {path}")


def _assert_finite(tree: Any) -> None:
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(x))), tree


# ------------------------------------------------------------------------------ coverage


def test_battery_covers_every_transformation():
    assert len(set(om.TRANSFORMATIONS)) == len(om.TRANSFORMATIONS)
    assert set(ENTRIES) == set(om.TRANSFORMATIONS)


def test_transformations_names_every_public_factory():
    """A new factory returning a GradientTransformation cannot skip the battery."""
    factories = set()
    for name in om.__all__:
        obj = getattr(om, name)
        if inspect.isfunction(obj):
            ret = inspect.signature(obj).return_annotation
            if "GradientTransformation" in str(ret):
                factories.add(name)
    assert factories <= set(om.TRANSFORMATIONS), factories - set(om.TRANSFORMATIONS)
    for name in om.TRANSFORMATIONS:
        assert name in om.__all__ and callable(getattr(om, name)), name


# ------------------------------------------------------------------------------ composition


@pytest.mark.parametrize("name", NAMES)
def test_chains_with_sgd_and_adam(name):
    """In its place with each base: the method runs (finite, tree and dtypes kept, not a no-op),
    and its no-op configuration equals the base optimizer alone. A full optimizer runs alone
    and after ``optax.identity()``, bitwise alike."""
    entry = ENTRIES[name]
    params = _params()
    run = _eager(_run)
    for base in BASES if entry.uses_base else ["sgd"]:
        tx = entry.make(base, "full")
        _, _, u1, _ = run(entry, tx, params, 5)
        for u in u1:
            _assert_finite(u)
            chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
        if entry.role == "optimizer":
            _, _, u2, _ = run(entry, optax.chain(optax.identity(), tx), params, 5)
            _assert_close(u1, u2, rtol=0, atol=0, what=f"{name} after identity ({base})")
        _, _, ref, _ = run(entry, BASES[base](), params, 5)
        assert not all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(ref))
        ), f"{name} ({base}) changed nothing"
        if entry.noop is not None:
            noop = entry.noop(base)
            _, _, u3, _ = run(dataclasses.replace(entry, prepare=None), noop, params, 5)
            _assert_close(u3, ref, what=f"{name} no-op vs {base}")


@pytest.mark.parametrize("name", NAMES)
def test_inside_partition(name):
    """The method on part of the tree (labels for the full tree), optax.sgd on the rest."""
    entry = ENTRIES[name]
    params = _params()
    tx = optax.partition({"method": entry.make("sgd", "full"), "rest": optax.sgd(0.1)}, PART_LABELS)
    _, _, updates, _ = _run(entry, tx, params, 5, update=jax.jit(tx.update))
    sub_params = _sub(params)
    ref_tx = entry.make("sgd", "sub")
    _, _, ref_updates, _ = _eager(_run)(
        entry, ref_tx, sub_params, 5, grads=lambda p, t: _sub(_grads(params, t))
    )
    rest = optax.sgd(0.1)
    _, _, rest_updates, _ = _eager(_run)(
        dataclasses.replace(entry, extra=_no_extra, prepare=None),
        rest,
        {"Dense_0": params["Dense_0"]},
        5,
        grads=lambda p, t: {"Dense_0": _grads(params, t)["Dense_0"]},
    )
    for t in range(5):
        _assert_close(_sub(updates[t]), ref_updates[t], rtol=1e-5, atol=1e-7, what=f"step {t}")
        _assert_close(updates[t]["Dense_0"], rest_updates[t]["Dense_0"], what=f"rest, step {t}")


def _inject(entry: Entry, static: tuple[str, ...] | None = None) -> tuple[Any, Any]:
    """(injected tx, plain tx) of an entry, with sgd as the base."""
    spec = entry.inject
    kwargs = spec.kwargs("sgd")
    static = spec.static if static is None else static
    inj = optax.inject_hyperparams(spec.factory, static_args=static)(**kwargs)
    plain = spec.factory(**kwargs)
    if spec.scaler:
        inj, plain = optax.chain(BASES["sgd"](), inj), optax.chain(BASES["sgd"](), plain)
    return inj, plain


def _set_hp(state: Any, hp: str, value: float) -> Any:
    """``state`` with ``hyperparams[hp] = value`` in its (single) inject_hyperparams state."""
    cls = optax.InjectStatefulHyperparamsState
    is_inj = lambda x: isinstance(x, cls)
    _find(state, cls)

    def put(s):
        if not is_inj(s):
            return s
        hps = dict(s.hyperparams)
        # keep the stored dtype and weak type (inject_hyperparams keeps an int weakly typed):
        # another type would retrace, as it would for a user who assigns an array of it
        hps[hp] = hps[hp] * 0 + value
        return s._replace(hyperparams=hps)

    return jax.tree.map(put, state, is_leaf=is_inj)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
    """Injected, it equals the plain build; changing the hyperparameter changes the updates;
    under jit the hyperparameter is traced (validation skipped) and a change does not retrace."""
    entry = ENTRIES[name]
    spec = entry.inject
    params = _params()
    inj, plain = _inject(entry)
    update, traces = _counting_jit(inj)
    p_inj, s_inj, u_inj, _ = _run(entry, inj, params, 3, update=update)
    _, _, u_plain, _ = _eager(_run)(entry, plain, params, 3)
    _assert_close(u_inj, u_plain, rtol=1e-5, atol=1e-7, what=f"{name} injected vs plain")
    assert spec.hp in _find(s_inj, optax.InjectStatefulHyperparamsState).hyperparams
    changed = _set_hp(s_inj, spec.hp, spec.new)
    _, _, u_same, _ = _run(entry, inj, p_inj, 3, state=s_inj, start=3, update=update)
    _, s_new, u_new, _ = _run(entry, inj, p_inj, 3, state=changed, start=3, update=update)
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(u_same), jax.tree.leaves(u_new))
    ), f"changing {spec.hp} did not change the updates of {name}"
    hps = _find(s_new, optax.InjectStatefulHyperparamsState).hyperparams
    np.testing.assert_allclose(np.asarray(hps[spec.hp], np.float64), spec.new, rtol=1e-6)
    assert traces[0] == 1


STRUCTURAL = [(n, a) for n, e in ENTRIES.items() for a in e.inject.static]


@pytest.mark.parametrize("name,arg", STRUCTURAL)
def test_inject_structural_int_must_be_static(name, arg):
    """A structural int left out of static_args is an error that names it, not a wrong run."""
    entry = ENTRIES[name]
    static = tuple(a for a in entry.inject.static if a != arg)
    inj, _ = _inject(entry, static=static)
    params = _params()
    with pytest.raises((ValueError, TypeError), match=arg):
        state = _init(entry, inj, params)
        jax.jit(lambda g, s, p: inj.update(g, s, p, **entry.extra(0)))(
            _grads(params, 0), state, params
        )


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite(name):
    """A NaN gradient skips the step: zero updates, inner state unchanged, and the run then
    goes on exactly as if that gradient had never come."""
    entry = ENTRIES[name]
    params = _params()
    tx = optax.apply_if_finite(entry.make("sgd", "full"), max_consecutive_errors=3)
    update = jax.jit(lambda g, s, p, extra: tx.update(g, s, p, **extra))
    good = [_grads(params, t) for t in range(4)]
    bad = jax.tree.map(lambda g: g, good[1])
    bad["head"]["kernel"] = bad["head"]["kernel"].at[0, 0].set(jnp.nan)
    # the skipped step gets the extras of step 1 too: a skipped step must not consume them
    seq = [(good[0], 0), (bad, 1), (good[1], 1), (good[2], 2), (good[3], 3)]
    state = _init(entry, tx, params)
    p = params
    outs = []
    for i, (g, t) in enumerate(seq):
        before = state
        u, state = update(g, state, p, entry.extra(t))
        if i == 1:
            assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
            for x in jax.tree.leaves(u):
                assert not np.any(np.asarray(x)), "a NaN step must give zero updates"
            chex.assert_trees_all_equal(state.inner_state, before.inner_state)
            _assert_finite(state.inner_state)
            continue
        p = optax.apply_updates(p, u)
        outs.append(u)
    inner = entry.make("sgd", "full")
    _, _, ref, _ = _eager(_run)(entry, inner, params, 4)
    _assert_close(outs, ref, rtol=1e-5, atol=1e-7, what=f"{name} under apply_if_finite")


@pytest.mark.parametrize("name", NAMES)
def test_multisteps(name):
    """``optax.MultiSteps(tx, 2)`` against ``tx`` on the mean gradient of every 2 mini-steps.

    What MultiSteps does with each method (optax 0.2.8): it calls the inner ``update`` on every
    mini-step with the running mean and keeps the new inner state only on the last one, so the
    method sees one ``update`` per ``every_k`` mini-steps, with the extras of that last
    mini-step. For every method here the result equals the method applied to the averaged
    gradients (checked over 5 updates, across multirate's cycle starts, LeRaC's curriculum,
    freeze's segments, the two regimes' switch, multi-brain merges, growth ratios), with all of
    the method's counts in *optimizer updates*, not mini-steps: multirate's cycle of ``k``
    updates spans ``k * every_k`` mini-steps; WUS's ``accumulation_size``, ``warmup`` and
    ``window`` count updates, and its ``value`` is the one passed with the last mini-step of
    each update: the others are dropped, not averaged (the WUS case feeds values whose
    per-update means are flat while the last ones are not: the run matches the last values and
    differs from the averaged ones, which would have opened a window); LeRaC's ticks, the two
    regimes' ``switch_step``, the growth ratios and the multi-brain merges count updates. A
    phased train step reads the same phase on every mini-step of an update, so it stays
    consistent. The docs must say all this; multirate's docstring already advises against
    wrapping it.
    """
    entry = ENTRIES[name]
    make = lambda: entry.make("sgd", "full")
    if name == "wus":
        # WUS's monitor alone, fed mini-step values whose per-update means are flat (0.5) while
        # the last value of each update moves by 0.4: averaged values would open a window
        values = [0.4, 0.6, 0.3, 0.7] * 3
        entry = dataclasses.replace(entry, extra=lambda i: {"value": jnp.float32(values[i])})
        make = lambda: om.wus(BASES["sgd"](), WB_LABELS, window=2, warmup=1)
    params = _params()
    every_k, updates = 2, 5
    tx = optax.MultiSteps(make(), every_k_schedule=every_k)
    update = jax.jit(lambda g, s, p, extra: tx.update(g, s, p, **extra))
    state = _init(entry, tx, params)
    p = params
    emitted = []
    for i in range(updates * every_k):
        u, state = update(_grads(params, 100 + i), state, p, entry.extra(i))
        if i % every_k < every_k - 1:
            assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(u))
        else:
            emitted.append(u)
        p = optax.apply_updates(p, u)

    def mean_grads(_, t):
        gs = [_grads(params, 100 + every_k * t + j) for j in range(every_k)]
        return jax.tree.map(lambda *x: sum(x) / every_k, *gs)

    last_extras = dataclasses.replace(entry, extra=lambda t: entry.extra(every_k * t + every_k - 1))
    _, _, ref, _ = _eager(_run)(last_extras, make(), params, updates, grads=mean_grads)
    if name == "wus":  # the averaged values would have opened a window: a different run
        mean_values = dataclasses.replace(entry, extra=lambda t: {"value": jnp.float32(0.5)})
        _, _, other, _ = _eager(_run)(mean_values, make(), params, updates, grads=mean_grads)
        with pytest.raises(AssertionError):
            _assert_close(emitted, other, rtol=1e-5, atol=1e-7)
    _assert_close(emitted, ref, rtol=1e-5, atol=1e-7, what=f"{name} under MultiSteps")


@pytest.mark.parametrize("name", NAMES)
def test_unread_gradients_are_ignored(name):
    """A NaN in a gradient the current phase does not read changes nothing (DESIGN.md 3)."""
    entry = ENTRIES[name]
    tx, update, _ = _jitted(name)
    params = _params()
    state = _init(entry, tx, params)
    checked = 0
    for t in range(6):
        needed = om.needed_tree(state, params)
        g = _grads(params, t)
        if not all(jax.tree.leaves(needed)):
            nan = jax.tree.map(lambda x, n: x if n else jnp.full_like(x, jnp.nan), g, needed)
            zero = jax.tree.map(lambda x, n: x if n else jnp.zeros_like(x), g, needed)
            u1, s1 = update(nan, state, params, **entry.extra(t))
            u2, s2 = update(zero, state, params, **entry.extra(t))
            _assert_finite((u1, s1))
            chex.assert_trees_all_equal((u1, s1), (u2, s2))
            checked += 1
        u, state = update(g, state, params, **entry.extra(t))
        params = optax.apply_updates(params, u)
    if not checked:
        tags = om.find_tags(state)
        assert all(all(row) for tag in tags for row in tag.reads), "an unread phase never came"
        pytest.skip(f"{name} reads every gradient in every phase")


def _mlp_loss(params: dict, batch: dict) -> jax.Array:
    """Softmax cross-entropy of a ReLU MLP written with jnp, over any ``Dense_i``/``head`` tree."""
    h = batch["x"]
    for m in [m for m in params if m != "head"]:
        h = jax.nn.relu(h @ params[m]["kernel"] + params[m]["bias"])
    logits = h @ params["head"]["kernel"] + params["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


@pytest.mark.parametrize("name", NAMES)
def test_phased_step_equals_full_gradient_step(name):
    """PhasedStep (host dispatch, only the needed gradients) against the plain full-gradient
    step: the same params within float tolerance over steps that cross phase changes, alone
    and inside ``optax.partition`` (where the method's masks map back through the holes)."""
    entry = ENTRIES[name]
    rng = np.random.default_rng(3)
    batches = [
        {
            "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 2, 8)),
        }
        for _ in range(6)
    ]
    for tx in (
        entry.make("sgd", "full"),
        optax.partition({"method": entry.make("sgd", "full"), "rest": optax.sgd(0.1)}, PART_LABELS),
    ):
        tags = om.find_tags(_init(entry, tx, _params()))
        phased = any(not all(r) for tag in tags for r in tag.reads)
        out = {}
        # a method whose every phase reads every gradient runs the full program by construction
        for dispatch in ("host", "full") if phased else ("host",):
            step = om.PhasedStep(_mlp_loss, tx, dispatch=dispatch)
            p, s = _params(), _init(entry, tx, _params())
            for t, batch in enumerate(batches):
                p, s, _, _ = step(p, s, batch, **entry.extra(t))
            out[dispatch] = (p, step.masks)
        masks = out["host"][1]
        if phased:
            assert len(masks) > 1, masks  # some steps skipped gradients
            _assert_close(out["host"][0], out["full"][0], rtol=1e-5, atol=1e-6, what=name)
        else:
            assert masks == [(True,) * len(jax.tree.leaves(_params()))], masks


# ------------------------------------------------------------------------------ jit, state


@pytest.mark.parametrize("name", NAMES)
def test_jit_state_and_traces(name):
    """20 jitted steps: one trace, state shapes/dtypes/structure never change; the first steps
    equal the same steps without jit within 1e-6 relative."""
    entry = ENTRIES[name]
    tx, update, traces = _jitted(name)
    params = _params()
    state0 = _init(entry, tx, params)
    p_jit, _, _, states = _run(entry, tx, params, 20, update=update, state=state0)
    assert traces[0] == 1, f"{name} traced {traces[0]} times over 20 steps"
    treedef = jax.tree.structure(state0)
    for s in states:
        assert jax.tree.structure(s) == treedef  # static fields (phase masks) included
        chex.assert_trees_all_equal_shapes_and_dtypes(s, state0)
    _assert_finite(p_jit)
    p4_jit, s4_jit, u_jit, _ = _run(entry, tx, params, 4, update=update, state=state0)
    p4_eager, s4_eager, u_eager, _ = _eager(_run)(entry, tx, params, 4)
    _assert_close(u_jit, u_eager, rtol=1e-6, atol=1e-7, what=f"{name} jit vs no jit, updates")
    _assert_close(p4_jit, p4_eager, rtol=1e-6, atol=1e-7, what=f"{name} jit vs no jit, params")
    _assert_close(s4_jit, s4_eager, rtol=1e-6, atol=1e-7, what=f"{name} jit vs no jit, state")


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params(name):
    """bf16 params and gradients: updates keep bf16, the state keeps its dtypes, no error."""
    entry = ENTRIES[name]
    tx = entry.make("sgd", "full")
    params = _params(jnp.bfloat16)
    state0 = _init(entry, tx, params)
    _, _, updates, states = _run(entry, tx, params, 4, update=jax.jit(tx.update))
    for u, s in zip(updates, states):
        chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(s, state0)
        _assert_finite(u)


# ------------------------------------------------------------------------------ checkpoint


def _grow_mlp(params: Any, state: Any, tx: optax.GradientTransformation) -> tuple[Any, Any]:
    """Grows an MLP((2, 2)) and its optimizer state to MLP((4, 4)) (one growth, 2 stages)."""
    big = MLP((4, 4), num_classes=2)
    shapes = jax.eval_shape(
        functools.partial(big.init, train=False), jax.random.PRNGKey(0), jnp.zeros((1, 3))
    )
    variables, state = om.grow(
        {"params": params}, state, 0, key=jax.random.PRNGKey(1), next_shapes=shapes, optimizer=tx
    )
    return variables["params"], state


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resumes_bitwise(name, tmp_path):
    """An orbax checkpoint at an awkward moment, restored into a fresh template, resumes
    bitwise (mid-freeze, mid-cycle, mid-window, right at the switch, between growth stages)."""
    entry = ENTRIES[name]
    steps, at_moment = entry.moment
    if name == "growth_lr_adaptation":
        tx = entry.make("sgd", "full")
        update = jax.jit(tx.update)
        small, _ = train_lib.init_model(MLP((2, 2), 2), jax.random.PRNGKey(0), np.zeros((1, 3)))
        p, s, _, _ = _run(entry, tx, small, steps, update=update, state=tx.init(small))
        params, state = _grow_mlp(p, s, tx)  # stage 1 starts: ratios refresh at its first step
        template = {"params": _params(), "opt_state": tx.init(_params())}
    else:
        tx, update, _ = _jitted(name)
        params, state, _, _ = _run(entry, tx, _params(), steps, update=update)
        template = {"params": _params(seed=5), "opt_state": tx.init(_params(seed=5))}
    assert at_moment(state), f"{name}: the checkpoint is not at the awkward moment"
    train_lib.save_checkpoint(tmp_path / "ckpt", {"params": params, "opt_state": state})
    restored = train_lib.restore_checkpoint(tmp_path / "ckpt", template)
    chex.assert_trees_all_equal(restored, {"params": params, "opt_state": state})
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
    p1, s1, _, _ = _run(entry, tx, params, 4, state=state, start=steps, update=update)
    p2, s2, _, _ = _run(
        entry, tx, restored["params"], 4, state=restored["opt_state"], start=steps, update=update
    )
    chex.assert_trees_all_equal(p1, p2)
    chex.assert_trees_all_equal(s1, s2)


# ------------------------------------------------------------------------------ properties


@st.composite
def trees(draw, dtype=jnp.float32):
    """A small random MLP-shaped tree: 1-2 hidden layers and a head, every width 1 or 3.

    24 trees from six leaf shapes: few shapes keep the eager runs' per-op compiles few.
    """
    hidden = draw(st.integers(1, 2))
    widths = [draw(st.sampled_from([1, 3])) for _ in range(hidden + 2)]
    modules = [f"Dense_{i}" for i in range(hidden)] + ["head"]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return {
        m: {
            "bias": jnp.asarray(rng.normal(size=(widths[i + 1],)), dtype),
            "kernel": jnp.asarray(rng.normal(size=(widths[i], widths[i + 1])), dtype),
        }
        for i, m in enumerate(modules)
    }


def _labels(params: dict, fn: Callable[[str, str, int], Any]) -> dict:
    mods = list(params)
    return {m: {leaf: fn(m, leaf, i) for leaf in params[m]} for i, m in enumerate(mods)}


def _mods(params: dict, labels: dict, label: Any) -> list[tuple[str, str]]:
    return [(m, leaf) for m in params for leaf in params[m] if labels[m][leaf] == label]


def _drive(tx, params, steps, extra=_no_extra, gscale=1.0):
    """Eager run; returns (incoming states, updates) per step."""
    with jax.disable_jit():
        state = tx.init(params)
        ins, outs = [], []
        for t in range(steps):
            ins.append(state)
            u, state = tx.update(_grads(params, t, scale=gscale), state, params, **extra(t))
            _assert_finite(u)
            assert jax.tree.structure(u) == jax.tree.structure(params)
            outs.append(u)
            params = optax.apply_updates(params, u)
        return ins + [state], outs


bases = st.sampled_from(sorted(BASES))
gscales = st.sampled_from([1e-3, 1.0, 1e3])


def prop_freeze_schedule(data):
    """Frozen leaves get exactly zero updates on the frozen steps."""
    params = data.draw(trees())
    labels = _labels(params, lambda m, leaf, i: "head" if m == "head" else "body")
    which = data.draw(st.sampled_from(["body", "head"]))
    a = data.draw(st.integers(0, 4))
    b = data.draw(st.one_of(st.none(), st.integers(a + 1, 6)))
    tx = om.freeze_schedule(BASES[data.draw(bases)](), labels, {which: (a, b)})
    _, outs = _drive(tx, params, 6, gscale=data.draw(gscales))
    for t, u in enumerate(outs):
        if a <= t and (b is None or t < b):
            for m, leaf in _mods(params, labels, which):
                assert not np.any(np.asarray(u[m][leaf])), (t, m, leaf)


def _multirate_invariant(params, labels, k, drift, ins, outs):
    """Without drift the slow part does not move on phase-1 steps; with drift it moves by the
    same held update on every step of a cycle; the phase is 0 exactly at cycle starts."""
    slow = _mods(params, labels, "slow")
    for t, (s, u) in enumerate(zip(ins, outs)):
        assert int(_find(s, om.MultirateState).tag.phase) == int(t % k != 0)
        for m, leaf in slow:
            x = np.asarray(u[m][leaf])
            if t % k:
                start = np.asarray(outs[t - t % k][m][leaf])
                np.testing.assert_array_equal(x, start if drift else np.zeros_like(x))


def _mr_labels(data, params):
    slow_head = data.draw(st.booleans())  # fast head or fast body
    return _labels(params, lambda m, leaf, i: "fast" if (m == "head") != slow_head else "slow")


def prop_multirate(data):
    params = data.draw(trees())
    labels = _mr_labels(data, params)
    k, drift = data.draw(st.integers(1, 3)), data.draw(st.booleans())
    base = data.draw(bases)
    tx = om.multirate(BASES[base](), BASES[base](), k, labels, linear_drift=drift)
    ins, outs = _drive(tx, params, 6, gscale=data.draw(gscales))
    _multirate_invariant(params, labels, k, drift, ins, outs)


def prop_multirate_sgd(data):
    params = data.draw(trees())
    labels = _mr_labels(data, params)
    k, drift = data.draw(st.integers(1, 3)), data.draw(st.booleans())
    lr = data.draw(st.floats(1e-4, 1.0))
    mom = data.draw(st.floats(0.0, 0.99))
    wd = data.draw(st.sampled_from([0.0, 1e-3]))
    tx = om.multirate_sgd(lr, k, labels, momentum=mom, linear_drift=drift, weight_decay=wd)
    ins, outs = _drive(tx, params, 6, gscale=data.draw(gscales))
    _multirate_invariant(params, labels, k, drift, ins, outs)


def prop_multirate_subgroups(data):
    """Fast steps move only unmasked entries; the slow step only masked ones (fast leaves,
    biases by default, never on the slow step); the slow step is the last of each cycle."""
    params = data.draw(trees())
    k = data.draw(st.integers(1, 3))
    q = data.draw(st.floats(0.1, 0.9))
    tx = om.multirate_subgroups(
        data.draw(st.floats(1e-3, 0.5)),
        k,
        q,
        seed=data.draw(st.integers(0, 1000)),
        momentum=data.draw(st.floats(0.0, 0.95)),
    )
    ins, outs = _drive(tx, params, 2 * (k + 1), gscale=data.draw(gscales))
    for t, (s, u) in enumerate(zip(ins, outs)):
        slow_step = bool(s.slow_step)
        assert slow_step == (t % (k + 1) == k)
        for m in params:
            for leaf in params[m]:
                mask = np.asarray(s.mask[m][leaf])
                moved = np.asarray(u[m][leaf]) != 0
                assert not np.any(moved & (mask if not slow_step else ~mask))
                if leaf == "bias":
                    assert not mask.any() and (not slow_step or not moved.any())


def prop_multirate_timescales(data):
    """When every brain meets brain 0, each stored brain equals the merged live params."""
    params = data.draw(trees())
    ms = data.draw(st.sampled_from([(1, 2), (1, 3), (1, 2, 4), (2, 4)]))
    tx = om.multirate_timescales(
        data.draw(st.floats(1e-3, 0.5)),
        ms,
        momentum=data.draw(st.floats(0.0, 0.95)),
        weight_decay=data.draw(st.sampled_from([0.0, 1e-3])),
    )
    steps = 2 * ms[-1] // ms[0]
    ins, outs = _drive(tx, params, steps, gscale=data.draw(gscales))
    p = params
    for t, u in enumerate(outs):
        p = optax.apply_updates(p, u)
        if (t + 1) % (ms[-1] // ms[0]) == 0:
            for brain in ins[t + 1].brains:
                chex.assert_trees_all_close(brain, p, rtol=1e-6, atol=1e-6)


def prop_wus(data):
    """Weights never change inside a window; the phase is 1 exactly while a window is open."""
    params = data.draw(trees())
    labels = _labels(params, lambda m, leaf, i: "bias" if leaf == "bias" else "weight")
    window = data.draw(st.integers(1, 3))
    acc = data.draw(st.integers(1, 2))
    forced = data.draw(st.lists(st.integers(1, 4), max_size=2, unique=True))
    values = data.draw(st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8))
    tx = om.wus(
        BASES[data.draw(bases)](),
        labels,
        threshold=data.draw(st.sampled_from([0.0, 0.05, 1.0])),
        window=window,
        accumulation_size=acc,
        warmup=data.draw(st.integers(0, 2)),
        lr_factor=data.draw(st.sampled_from([None, 0.5])),
        force_windows=forced or None,
    )
    ins, outs = _drive(tx, params, 8, extra=lambda t: {"value": values[t]})
    for s, u in zip(ins, outs):
        w = _find(s, om.WusState)
        assert int(w.tag.phase) == int(int(w.skip_left) > 0)
        if int(w.tag.phase):
            for m, leaf in _mods(params, labels, "weight"):
                assert not np.any(np.asarray(u[m][leaf])), (m, leaf)


def _lerac_invariant(params, depth, ins, outs, base_outs, scaler_state):
    """Scales lie in (0, 1], never decrease over steps, and each depth's update is the base
    update times its scale."""
    prev = None
    for s, u, b in zip(ins[1:], outs, base_outs):
        sc = np.asarray(scaler_state(s).scales, np.float64)
        assert np.all(sc > 0) and np.all(sc <= 1)
        if prev is not None:
            assert np.all(sc >= prev)
        prev = sc
        for m in params:
            for leaf in params[m]:
                want = np.asarray(b[m][leaf], np.float32) * np.float32(sc[depth[m][leaf]])
                np.testing.assert_allclose(np.asarray(u[m][leaf]), want, rtol=1e-6, atol=1e-30)


def _lerac_kwargs(data, n):
    mode = data.draw(st.sampled_from(["paper", "staircase"]))
    kw = dict(mode=mode, decay=data.draw(st.floats(0.05, 1.0)))
    kw["steps_per_tick"] = data.draw(st.integers(1, 2))
    if mode == "paper":
        kw["k"] = data.draw(st.integers(0, 5))
    else:
        kw["c"] = data.draw(st.floats(1.5, 20.0))
    if data.draw(st.booleans()):
        kw["head_scale"] = data.draw(st.floats(0.01, 1.0))
    return kw


def prop_scale_by_lerac(data):
    params = data.draw(trees())
    depth = _labels(params, lambda m, leaf, i: i)
    kw = _lerac_kwargs(data, len(params))
    base = data.draw(bases)
    gscale = data.draw(gscales)
    tx = optax.chain(BASES[base](), om.scale_by_lerac(depth, **kw))
    ins, outs = _drive(tx, params, 6, gscale=gscale)
    _, base_outs = _drive(BASES[base](), params, 6, gscale=gscale)  # (grads ignore params)
    _lerac_invariant(params, depth, ins, outs, base_outs, lambda s: s[1])


def prop_lerac(data):
    params = data.draw(trees())
    depth = _labels(params, lambda m, leaf, i: i)
    kw = _lerac_kwargs(data, len(params))
    base = data.draw(bases)
    gscale = data.draw(gscales)
    tx = om.lerac(BASES[base](), depth, **kw)
    ins, outs = _drive(tx, params, 6, gscale=gscale)
    _, base_outs = _drive(BASES[base](), params, 6, gscale=gscale)  # (grads ignore params)
    _lerac_invariant(params, depth, ins, outs, base_outs, lambda s: s[1])


def _regimes_invariant(ins):
    """The phase never goes back; ``switched_at`` is set once, to the first phase-1 call."""
    phases = [int(_find(s, om.TwoRegimesState).phase) for s in ins]
    assert phases == sorted(phases)
    first = next((t for t, ph in enumerate(phases[1:]) if ph == 1), None)
    last = _find(ins[-1], om.TwoRegimesState)
    assert int(last.switched_at) == (-1 if first is None else first)
    for s in ins:
        r = _find(s, om.TwoRegimesState)
        assert int(r.tag.phase) == int(r.phase)


def prop_two_regimes(data):
    params = data.draw(trees())
    base = data.draw(bases)
    trigger = data.draw(st.sampled_from(["step", "plateau", "signal"]))
    kw: dict[str, Any] = {}
    extra = _no_extra
    if trigger == "step":
        kw["switch_step"] = data.draw(st.integers(0, 7))
    elif trigger == "plateau":
        kw["plateau"] = om.PlateauTrigger(
            patience=data.draw(st.integers(1, 2)),
            accumulation_size=data.draw(st.integers(1, 2)),
        )
        values = data.draw(st.lists(st.floats(0.0, 2.0), min_size=6, max_size=6))
        extra = lambda t: {"value": values[t]}
    else:
        kw["signal"] = True
        flags = data.draw(st.lists(st.booleans(), min_size=6, max_size=6))
        extra = lambda t: {"switch": flags[t]}
    tx = om.two_regimes(BASES[base](), BASES[OTHER[base]](), **kw)
    ins, _ = _drive(tx, params, 6, extra=extra, gscale=data.draw(gscales))
    _regimes_invariant(ins)


def prop_two_regimes_sgd(data):
    params = data.draw(trees())
    total = data.draw(st.integers(1, 6))
    frac = data.draw(st.floats(0.05, 1.0))
    tx = om.two_regimes_sgd(
        data.draw(st.floats(1e-3, 1.0)),
        total_steps=total,
        large_fraction=frac,
        weight_decay=data.draw(st.sampled_from([0.0, 1e-3])),
    )
    ins, _ = _drive(tx, params, 6, gscale=data.draw(gscales))
    _regimes_invariant(ins)
    switch = int(round(frac * total))
    for t, s in enumerate(ins[1:]):
        assert int(_find(s, om.TwoRegimesState).phase) == int(t >= switch)


def prop_growth_lr_adaptation(data):
    """Each kernel element's update is the base update times ``r_b = N_b / N_0`` of its birth
    stage (``r = 1`` for an empty stage); other leaves pass through."""
    params = data.draw(trees())
    stages = data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 1000))
    rng = np.random.default_rng(seed)
    birth = jax.tree.map(
        lambda x: jnp.asarray(rng.integers(0, stages, np.shape(x)), jnp.int8), params
    )
    base = data.draw(bases)
    lra = om.growth_lr_adaptation(stages)
    b_tx = BASES[base]()
    with jax.disable_jit():
        bs = b_tx.init(params)
        s = lra.init(params)._replace(birth=birth)
        g = _grads(params, 0)
        bu, _ = b_tx.update(g, bs, params)
        u, s = lra.update(bu, s, params)
    sq = np.zeros(stages)
    for m in params:
        w = np.asarray(params[m]["kernel"], np.float64) ** 2
        np.add.at(sq, np.asarray(birth[m]["kernel"]).ravel(), w.ravel())
    counts = np.zeros(stages)
    for m in params:
        np.add.at(counts, np.asarray(birth[m]["kernel"]).ravel(), 1)
    r = np.where(counts > 0, np.sqrt(sq) / np.sqrt(max(sq[0], 1e-12)), 1.0)
    np.testing.assert_allclose(np.asarray(s.ratios), r, rtol=1e-5)
    for m in params:
        bk = np.asarray(birth[m]["kernel"])
        want = np.asarray(bu[m]["kernel"], np.float64) * r[bk]
        np.testing.assert_allclose(np.asarray(u[m]["kernel"]), want, rtol=1e-5, atol=1e-30)
        np.testing.assert_array_equal(np.asarray(u[m]["bias"]), np.asarray(bu[m]["bias"]))


PROPERTIES: dict[str, Callable[[Any], None]] = {
    "freeze_schedule": prop_freeze_schedule,
    "multirate": prop_multirate,
    "multirate_sgd": prop_multirate_sgd,
    "multirate_subgroups": prop_multirate_subgroups,
    "multirate_timescales": prop_multirate_timescales,
    "wus": prop_wus,
    "scale_by_lerac": prop_scale_by_lerac,
    "lerac": prop_lerac,
    "two_regimes": prop_two_regimes,
    "two_regimes_sgd": prop_two_regimes_sgd,
    "growth_lr_adaptation": prop_growth_lr_adaptation,
}


def test_every_entry_has_a_property():
    assert set(PROPERTIES) == set(ENTRIES)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_properties(name, data):
    """Random small trees and hyperparameters: updates finite, structure kept, the spec's
    invariant holds."""
    PROPERTIES[name](data)
