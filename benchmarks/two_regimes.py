"""Two regimes: one tuned knob (the large SGD rate, then Adam) against tuned step schedules.

A reproduction at CPU scale, on mnist1d, the MNIST subset and sklearn digits with the MLP
(2x256 ReLU, batch 64, coupled L2 5e-4 in every arm)::

    python -m benchmarks.two_regimes            # full: writes benchmarks/results/two_regimes.*
    python -m benchmarks.two_regimes --quick    # seconds: two_regimes.quick.*

Arms (tuning grids): two-regime ``two_regimes_sgd`` (``learning_rate`` in {0.03, 0.1, 0.3, 1.0}),
two-regime with SGD(lr/10) in phase 1 (same grid), SGD with momentum 0.9 and a step schedule
(lr in {0.01, 0.03, 0.1, 0.3} x drops at {50, 75}% or {33, 66}%), cosine (4), one-cycle (4);
then small-only (Adam from the start) and large-only (no switch) at the two-regime's rate. Each
tuned arm's config is picked on mean validation accuracy over 2 tuning seeds, then every arm runs
on fresh seeds and reports test accuracy. Ablations on mnist1d: the large fraction, the plateau
trigger, and the momentum/rate equivalence of the large-step regime.

Every run of one data set is one program: an MLP trained by a ``lax.scan`` over epochs of a
``lax.scan`` over steps, ``vmap``-ed over (arm, config, seed) in chunks of a fixed width, so a
data set compiles once. The arms differ only in traced hyperparameters of one
``two_regimes`` optimizer: phase 0 is ``chain(add_decayed_weights, sgd(schedule, momentum))``,
phase 1 is ``chain(add_decayed_weights, adam(1e-3) or sgd(lr/10))`` and the switch step is traced
(``switch_step = T`` never switches, which is bitwise the phase-0 optimizer alone, as
``tests/test_two_regimes.py`` checks). With ``momentum=0``, a constant schedule and Adam this is
exactly the body of ``two_regimes_sgd``.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from optax_multirate.data import Split, load_dataset, num_batches, validation_split
from optax_multirate.models import MLP
from optax_multirate.two_regimes import PlateauTrigger, two_regimes

logger = logging.getLogger(__name__)

NAME = "two_regimes"
FEATURES = (256, 256)
BATCH_SIZE = 64
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
SMALL_LR = 1e-3  # Adam's customary rate in phase 1, left untuned
LARGE_FRACTION = 0.8
VAL_FRACTION = 0.1
TR_GRID = (0.03, 0.1, 0.3, 1.0)
SGD_GRID = (0.01, 0.03, 0.1, 0.3)
DROPS = ((0.5, 0.75), (0.33, 0.66))
ABLATION_FRACTIONS = (0.5, 0.65, 0.9)
MOMENTUM_DIAG_RATES = (1.0, 0.1)  # effective rates eta / (1 - mu): one large, one small
TUNING_SEEDS = (100, 101)
FULL_SEEDS = 5
CHUNK = 12  # runs per vmapped call (fixed, so that each program compiles once per data set)
# data set -> (summary prefix, full epochs)
DATASETS = {"mnist1d": ("mnist1d_", 30), "mnist_subset": ("mnist_", 12), "digits": ("digits_", 40)}
SCHEDULE_ARMS = ("step", "cosine", "onecycle")
KINDS = {"constant": 0, "step": 1, "cosine": 2, "onecycle": 3}
GOAL_PT = -0.3

CLAIM = (
    "Leclerc & Madry (arXiv 2002.10376), abstract and introduction (the body could not be "
    "read): SGD training passes through a large-step regime that optimizes poorly but drives "
    "generalization, and a small-step regime that optimizes fast, convex-like, but generalizes "
    "poorly on its own; momentum brings no visible benefit in the large-step regime once the "
    "rate is matched; treating the regimes separately, with an algorithm specialized to each, "
    "simplifies schedules considerably. No number from the paper is available. Our goal at "
    "this scale: the two-regime arm within 0.3 points of the best tuned schedule (step, "
    "cosine, one-cycle) on at least 2 of 3 data sets, with no more configs tried."
)


# ------------------------------------------------------------------------------------ arms


def _spec(arm: str, seed: int, stage: str, **hp: Any) -> dict[str, Any]:
    base = {
        "lr": 0.1,
        "momentum": 0.0,
        "kind": "constant",
        "drops": (1.0, 1.0),
        "fraction": LARGE_FRACTION,
        "small": "adam",
        "plateau": False,
    }
    base.update(hp)
    return {"arm": arm, "seed": seed, "stage": stage, **base}


def _grid(arm: str, quick: bool) -> list[dict[str, Any]]:
    """The tuning grid of a tuned arm (one config each under ``--quick``)."""
    tr, sgd_lrs, drops = (TR_GRID, SGD_GRID, DROPS) if not quick else ((0.3,), (0.1,), DROPS[:1])
    if arm == "two_regime":
        return [{"lr": lr} for lr in tr]
    if arm == "two_regime_sgd":
        return [{"lr": lr, "small": "sgd"} for lr in tr]
    common = {"momentum": MOMENTUM, "fraction": math.inf}
    if arm == "step":
        return [{"lr": lr, "kind": "step", "drops": d, **common} for lr in sgd_lrs for d in drops]
    return [{"lr": lr, "kind": arm, **common} for lr in sgd_lrs]


TUNED_ARMS = ("two_regime", "two_regime_sgd", *SCHEDULE_ARMS)


def _hp_arrays(specs: Sequence[Mapping[str, Any]], total: int) -> dict[str, np.ndarray]:
    """Traced hyperparameters of each run (switch step ``total`` never switches)."""

    def switch(s):
        return total if s["fraction"] > 1 else int(round(s["fraction"] * total))

    return {
        "lr": np.asarray([s["lr"] for s in specs], np.float32),
        "momentum": np.asarray([s["momentum"] for s in specs], np.float32),
        "kind": np.asarray([KINDS[s["kind"]] for s in specs], np.int32),
        "b1": np.asarray([int(round(s["drops"][0] * total)) for s in specs], np.int32),
        "b2": np.asarray([int(round(s["drops"][1] * total)) for s in specs], np.int32),
        "switch": np.asarray([switch(s) for s in specs], np.int32),
        "small_sgd": np.asarray([s["small"] == "sgd" for s in specs], bool),
    }


def _schedule(hp: Mapping[str, jax.Array], total: int) -> Callable[[jax.Array], jax.Array]:
    """Phase-0 rate: constant, step (x0.1 at b1 and b2), cosine to 0, or one-cycle."""

    def sched(count):
        lr = hp["lr"]
        step = lr * jnp.where(count < hp["b1"], 1.0, jnp.where(count < hp["b2"], 0.1, 0.01))
        t = jnp.minimum(count, total).astype(jnp.float32)
        cosine = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t / total))
        onecycle = optax.cosine_onecycle_schedule(total, peak_value=lr)(count)
        kind = hp["kind"]
        return jnp.select([kind == 0, kind == 1, kind == 2], [lr, step, cosine], onecycle)

    return sched


def _either(flag: jax.Array, a: optax.GradientTransformation, b: optax.GradientTransformation):
    """``a``'s updates where ``flag`` else ``b``'s (both run: a per-run choice under vmap)."""

    def init_fn(params):
        return a.init(params), b.init(params)

    def update_fn(updates, state, params=None):
        ua, sa = a.update(updates, state[0], params)
        ub, sb = b.update(updates, state[1], params)
        return jax.tree.map(lambda x, y: jnp.where(flag, x, y), ua, ub), (sa, sb)

    return optax.GradientTransformation(init_fn, update_fn)


def _make_tx(hp: Mapping[str, jax.Array], total: int, plateau: PlateauTrigger | None):
    wd = optax.add_decayed_weights(WEIGHT_DECAY)
    large = optax.chain(wd, optax.sgd(_schedule(hp, total), momentum=hp["momentum"]))
    small = optax.chain(
        wd, _either(hp["small_sgd"], optax.sgd(hp["lr"] / 10.0), optax.adam(SMALL_LR))
    )
    if plateau is not None:
        return two_regimes(large, small, plateau=plateau)
    return two_regimes(large, small, switch_step=hp["switch"])


# ------------------------------------------------------------------------------- training


def _arrays(split: Split) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(split.x.reshape(len(split), -1)), jnp.asarray(split.y)


def _program(model, data, epochs: int, nb: int, plateau: PlateauTrigger | None):
    """``run(hp, params, idx)``: a jitted vmapped training of many runs of one data set.

    The initial params come in as inputs (Flax's random init, compiled inside the program,
    would more than double its compile time).
    """
    (xtr, ytr), (xva, yva), (xte, yte) = (_arrays(s) for s in data)
    total = epochs * nb

    def ce(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def accuracy(p, x, y):
        return jnp.mean(jnp.argmax(model.apply({"params": p}, x), -1) == y)

    def run(hp, params, idx):
        tx = _make_tx(hp, total, plateau)

        def step(carry, b):
            p, s = carry
            loss, g = jax.value_and_grad(ce)(p, xtr[b], ytr[b])
            u, s = tx.update(g, s, p, **({"value": loss} if plateau is not None else {}))
            return (optax.apply_updates(p, u), s), loss

        def epoch(carry, e_idx):
            carry, losses = jax.lax.scan(step, carry, e_idx)
            p = carry[0]
            return carry, (jnp.mean(losses), accuracy(p, xva, yva), accuracy(p, xte, yte))

        (_, state), (tl, va, te) = jax.lax.scan(epoch, (params, tx.init(params)), idx)
        return {
            "train_loss": tl,
            "val_accuracy": va,
            "test_accuracy": te,
            "switched_at": state.switched_at,
        }

    return jax.jit(jax.vmap(run))


def _order(n: int, seed: int, epochs: int, nb: int) -> np.ndarray:
    """Batch indices of every epoch: ``optax_multirate.data.batches``' order rule."""
    return np.stack(
        [
            np.random.default_rng([seed, e]).permutation(n)[: nb * BATCH_SIZE].reshape(nb, -1)
            for e in range(epochs)
        ]
    ).astype(np.int32)


class _Runner:
    """Runs lists of run specs on one data set, in fixed-width vmapped chunks."""

    def __init__(self, name: str, epochs: int, chunk: int, quick: bool):
        ds = load_dataset(name)
        train, val = validation_split(ds.train, VAL_FRACTION, seed=0)
        if quick:
            train = Split(x=train.x[:1024], y=train.y[:1024])
        self.name, self.epochs, self.chunk = name, epochs, chunk
        self.nb = num_batches(train, BATCH_SIZE)
        self.total = epochs * self.nb
        self.n_train = len(train)
        self.model = MLP(FEATURES, num_classes=ds.num_classes)
        self.data = (train, val, ds.test)
        self.sizes = {"train": len(train), "val": len(val), "test": len(ds.test)}
        self._programs: dict[Any, Any] = {}
        self._orders: dict[int, np.ndarray] = {}
        self._inits: dict[int, Any] = {}
        self.compile_s = 0.0
        self.train_s = 0.0

    def _prog(self, plateau: PlateauTrigger | None):
        if plateau not in self._programs:
            self._programs[plateau] = _program(self.model, self.data, self.epochs, self.nb, plateau)
        return self._programs[plateau]

    def _idx(self, seed: int) -> np.ndarray:
        if seed not in self._orders:
            self._orders[seed] = _order(self.n_train, seed, self.epochs, self.nb)
        return self._orders[seed]

    def _init(self, seed: int) -> Any:
        """Initial params of a seed (eager Flax init; shared by every arm of the seed)."""
        if seed not in self._inits:
            x = jnp.zeros((1, self.data[0].x[0].size), jnp.float32)
            self._inits[seed] = self.model.init(jax.random.key(seed), x)["params"]
        return self._inits[seed]

    def run(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for plateau_on in (False, True):
            group = [s for s in specs if s["plateau"] == plateau_on]
            if not group:
                continue
            plateau = PlateauTrigger(patience=5, accumulation_size=self.nb) if plateau_on else None
            # The plateau program serves a handful of runs: its own width, still compiled once.
            width = self.chunk if not plateau_on else min(self.chunk, len(group))
            for i in range(0, len(group), width):
                out.extend(self._chunk(group[i : i + width], plateau, width))
        return out

    def _chunk(self, specs, plateau, width):
        n = len(specs)
        padded = specs + [specs[-1]] * (width - n)
        hp = _hp_arrays(padded, self.total)
        params = jax.tree.map(lambda *p: jnp.stack(p), *[self._init(s["seed"]) for s in padded])
        idx = np.stack([self._idx(s["seed"]) for s in padded])
        prog = self._prog(plateau)
        key = ("compiled", plateau)
        if key not in self._programs:
            t0 = time.perf_counter()
            self._programs[key] = prog.lower(hp, params, idx).compile()
            self.compile_s += time.perf_counter() - t0
            logger.info("%s: compiled in %.1f s", self.name, time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = jax.block_until_ready(self._programs[key](hp, params, idx))
        dt = time.perf_counter() - t0
        self.train_s += dt
        res = jax.device_get(res)
        logger.info("%s: %d runs (%s) in %.1f s", self.name, n, specs[0]["stage"], dt)
        rows = []
        for i, s in enumerate(specs):
            rows.append(
                {
                    **s,
                    "dataset": self.name,
                    "drops": list(s["drops"]),
                    "fraction": s["fraction"] if math.isfinite(s["fraction"]) else None,
                    "final_accuracy": float(res["test_accuracy"][i, -1]),
                    "val_accuracy": float(res["val_accuracy"][i, -1]),
                    "train_loss": float(res["train_loss"][i, -1]),
                    "switched_at": int(res["switched_at"][i]),
                    "train_time_s": dt / width,  # amortized over the vmapped chunk
                    "history": [
                        {
                            "epoch": e + 1,
                            "train_loss": float(res["train_loss"][i, e]),
                            "val_accuracy": float(res["val_accuracy"][i, e]),
                            "test_accuracy": float(res["test_accuracy"][i, e]),
                        }
                        for e in range(self.epochs)
                    ],
                }
            )
        return rows


# ------------------------------------------------------------------------------- protocol


def _config_key(spec: Mapping[str, Any]) -> tuple:
    return (spec["lr"], spec["kind"], tuple(spec["drops"]), spec["small"])


def _tune(runner: _Runner, quick: bool, tuning_seeds: Sequence[int]):
    specs = [
        _spec(arm, seed, "tune", **cfg)
        for seed in tuning_seeds
        for arm in TUNED_ARMS
        for cfg in _grid(arm, quick)
    ]
    rows = runner.run(specs)
    chosen, tried = {}, {}
    for arm in TUNED_ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        by_cfg: dict[tuple, list[dict[str, Any]]] = {}
        for r in mine:
            by_cfg.setdefault(_config_key(r), []).append(r)
        best = max(by_cfg.values(), key=lambda rs: statistics.fmean(r["val_accuracy"] for r in rs))
        cfg = {k: best[0][k] for k in ("lr", "momentum", "kind", "drops", "fraction", "small")}
        cfg["drops"] = tuple(cfg["drops"])
        cfg["fraction"] = math.inf if cfg["fraction"] is None else cfg["fraction"]
        chosen[arm], tried[arm] = cfg, len(by_cfg)
    for r in rows:
        r.pop("history")  # tuning runs keep their final figures only
    return chosen, tried, rows


def _final_specs(chosen, seeds, ablations: bool) -> list[dict[str, Any]]:
    lr = chosen["two_regime"]["lr"]
    specs = []
    for seed in seeds:
        for arm in TUNED_ARMS:
            specs.append(_spec(arm, seed, "final", **chosen[arm]))
        specs.append(_spec("small_only", seed, "final", lr=lr, fraction=0.0))
        specs.append(_spec("large_only", seed, "final", lr=lr, fraction=math.inf))
        if ablations:
            for f in ABLATION_FRACTIONS:
                specs.append(
                    _spec(f"two_regime_fraction_{f:g}", seed, "ablation", lr=lr, fraction=f)
                )
            specs.append(_spec("two_regime_plateau", seed, "ablation", lr=lr, plateau=True))
    if ablations:
        for seed in seeds[:2]:
            for eff in MOMENTUM_DIAG_RATES:
                for mu in (MOMENTUM, 0.0):
                    specs.append(
                        _spec(
                            f"momentum_diag_eff{eff:g}_mu{mu:g}",
                            seed,
                            "diagnostic",
                            lr=eff * (1 - mu),
                            momentum=mu,
                            fraction=math.inf,
                        )
                    )
    return specs


# -------------------------------------------------------------------------------- reports


def _accs(rows, arm, key="final_accuracy"):
    return [r[key] for r in sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])]


def _summarize(prefix: str, rows, tried, runner: _Runner) -> tuple[dict[str, Any], str]:
    s: dict[str, Any] = {}
    tr = _accs(rows, "two_regime")
    means = {a: statistics.fmean(_accs(rows, a)) for a in dict.fromkeys(r["arm"] for r in rows)}
    best = max(SCHEDULE_ARMS, key=lambda a: means[a])
    delta, lo, hi = harness.paired_ci(_accs(rows, best), tr)
    s[prefix + "accuracy_delta_vs_best_schedule_pt"] = 100 * delta
    s[prefix + "accuracy_delta_vs_best_schedule_ci_low_pt"] = 100 * lo
    s[prefix + "accuracy_delta_vs_best_schedule_ci_high_pt"] = 100 * hi
    s[prefix + "configs_tried"] = tried["two_regime"]
    s[prefix + "best_schedule_configs_tried"] = tried[best]
    for arm in ("small_only", "large_only", "two_regime_sgd", *SCHEDULE_ARMS):
        s[prefix + f"{arm}_accuracy_delta_pt"] = 100 * harness.paired_ci(tr, _accs(rows, arm))[0]
    m, sd = harness.mean_std(tr)
    s[prefix + "two_regime_accuracy"], s[prefix + "two_regime_accuracy_std"] = m, sd
    s[prefix + "best_schedule_accuracy"] = means[best]
    losses = {a: statistics.fmean(_accs(rows, a, "train_loss")) for a in means}
    for arm in ("two_regime", "small_only", "large_only"):
        s[prefix + f"{arm}_train_loss"] = losses[arm]
    s[prefix + "goal_met"] = bool(
        s[prefix + "accuracy_delta_vs_best_schedule_pt"] >= GOAL_PT
        and tried["two_regime"] <= tried[best]
    )
    # The regime checks: small-only should fit at least as well as two-regime yet test lower
    # by more than 2 std; large-only should fit worse and test lower.
    small = _accs(rows, "small_only")
    s[prefix + "small_only_fits_at_least_as_well"] = bool(
        losses["small_only"] <= losses["two_regime"]
    )
    s[prefix + "small_only_tests_lower_by_2std"] = bool(statistics.fmean(small) < m - 2 * sd)
    s[prefix + "small_only_fits_better_generalizes_worse"] = bool(
        s[prefix + "small_only_fits_at_least_as_well"]
        and s[prefix + "small_only_tests_lower_by_2std"]
    )
    s[prefix + "large_only_fits_worse_generalizes_worse"] = bool(
        losses["large_only"] > losses["two_regime"] and means["large_only"] < m
    )
    s[prefix + "switch_loss_ratio_adam"] = _switch_loss_ratio(rows, "two_regime", runner)
    s[prefix + "switch_loss_ratio_sgd"] = _switch_loss_ratio(rows, "two_regime_sgd", runner)
    s[prefix + "train_time_s"] = runner.train_s
    s[prefix + "compile_time_s"] = runner.compile_s

    lines = [
        f"### {runner.name} ({runner.sizes['train']} train / {runner.sizes['val']} val / "
        f"{runner.sizes['test']} test, {runner.epochs} epochs, {runner.total} updates)",
        "",
        "| arm | configs tried | chosen config | test accuracy (%) | vs two-regime (pt) "
        "| final train loss |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for arm in means:
        accs = _accs(rows, arm)
        r0 = next(r for r in rows if r["arm"] == arm)
        cfg = _describe(r0)
        am, asd = harness.mean_std(accs)
        d = 100 * harness.paired_ci(tr, accs)[0] if len(accs) == len(tr) else math.nan
        lines.append(
            f"| {arm} | {tried.get(arm, 0)} | {cfg} | {100 * am:.2f} ± {100 * asd:.2f} "
            f"| {d:+.2f} | {losses[arm]:.4f} |"
        )
    lines += [
        "",
        f"Two-regime minus the best schedule (**{best}**): "
        f"{s[prefix + 'accuracy_delta_vs_best_schedule_pt']:+.2f} pt "
        f"(95% paired CI {100 * lo:+.2f} to {100 * hi:+.2f}); configs tried "
        f"{tried['two_regime']} vs {tried[best]}. Goal (>= {GOAL_PT} pt with no more configs): "
        f"**{'met' if s[prefix + 'goal_met'] else 'not met'}**.",
        "",
    ]
    return s, "\n".join(lines)


def _switch_loss_ratio(rows, arm: str, runner: _Runner) -> float:
    """Mean over seeds of train loss(epoch after the switch) / train loss(epoch before)."""
    e0 = int(round(LARGE_FRACTION * runner.total)) // runner.nb  # epochs fully in phase 0
    if not 1 <= e0 < runner.epochs:
        return math.nan
    ratios = [
        r["history"][e0]["train_loss"] / r["history"][e0 - 1]["train_loss"]
        for r in rows
        if r["arm"] == arm
    ]
    return statistics.fmean(ratios)


def _verdict(s: Mapping[str, Any]) -> str:
    """The regime checks per data set, written from the summary (no number typed by hand)."""

    def yes(x):
        return "yes" if x else "no"

    lines = ["**Regime checks, per data set:**", ""]
    for name, (p, _) in DATASETS.items():
        sgd = s[p + "two_regime_sgd_accuracy_delta_pt"]
        lines.append(
            f"- {name}: goal (two-regime >= best schedule {GOAL_PT} pt, no more configs) "
            f"**{'met' if s[p + 'goal_met'] else 'not met'}** "
            f"({s[p + 'accuracy_delta_vs_best_schedule_pt']:+.2f} pt); small-only fits at least "
            f"as well: {yes(s[p + 'small_only_fits_at_least_as_well'])}, tests lower by more "
            f"than 2 std: {yes(s[p + 'small_only_tests_lower_by_2std'])}; large-only fits worse "
            f"and tests lower: {yes(s[p + 'large_only_fits_worse_generalizes_worse'])}; "
            f"SGD(lr/10) in phase 1 instead of Adam: {sgd:+.2f} pt; train loss across the "
            f"switch (epoch after / epoch before): Adam x{s[p + 'switch_loss_ratio_adam']:.2f}, "
            f"SGD(lr/10) x{s[p + 'switch_loss_ratio_sgd']:.2f}."
        )
    if "mnist1d_momentum_large_rate_train_loss_ratio" in s:
        lines.append(
            "- momentum in the large-step regime (mnist1d): final train loss of "
            "SGD(eta, 0.9) / SGD(eta/(1-0.9), 0) is "
            f"{s['mnist1d_momentum_large_rate_train_loss_ratio']:.2f} at the large rate and "
            f"{s['mnist1d_momentum_small_rate_train_loss_ratio']:.2f} at the small one."
        )
    return "\n".join(lines) + "\n"


def _describe(r: Mapping[str, Any]) -> str:
    if r["arm"] == "small_only":
        return f"Adam {SMALL_LR:g} from the start (switch_step=0)"
    parts = [f"lr {r['lr']:g}"]
    if r["momentum"]:
        parts.append(f"mu {r['momentum']:g}")
    if r["kind"] == "step":
        parts.append(f"drops {r['drops'][0]:g}/{r['drops'][1]:g}")
    elif r["kind"] != "constant":
        parts.append(r["kind"])
    if r["plateau"]:
        parts.append("plateau switch")
    elif r["arm"] == "large_only":
        parts.append("no switch")
    elif r["fraction"] is not None and r["kind"] == "constant":
        parts.append(f"switch at {r['fraction']:g} T")
        parts.append("then " + ("SGD lr/10" if r["small"] == "sgd" else f"Adam {SMALL_LR:g}"))
    return ", ".join(parts)


def _ablation_md(rows, runner: _Runner, summary: dict[str, Any]) -> str:
    tr = _accs(rows, "two_regime")
    lines = [
        "### Ablations on mnist1d (two-regime's rate, final seeds)",
        "",
        "| variant | test accuracy (%) | vs two-regime (pt) | final train loss | switch (epoch) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for arm in dict.fromkeys(r["arm"] for r in rows if r["stage"] == "ablation"):
        accs = _accs(rows, arm)
        am, asd = harness.mean_std(accs)
        d = 100 * harness.paired_ci(tr, accs)[0]
        sw = [r["switched_at"] for r in rows if r["arm"] == arm]
        sw_ep = statistics.fmean(x / runner.nb if x >= 0 else math.nan for x in sw)
        loss = statistics.fmean(_accs(rows, arm, "train_loss"))
        key = "mnist1d_" + arm.removeprefix("two_regime_").replace(".", "")
        summary[key + "_accuracy_delta_pt"] = d
        if arm.endswith("plateau"):
            summary[key + "_switch_epoch"] = sw_ep
        lines.append(
            f"| {arm} | {100 * am:.2f} ± {100 * asd:.2f} | {d:+.2f} | {loss:.4f} | {sw_ep:.1f} |"
        )
    lines += [
        "",
        "Momentum in the large-step regime (claim (c)): SGD(eta, mu=0.9) against "
        "SGD(eta/(1-mu), mu=0), constant rate, no switch; final training loss and test accuracy "
        f"(mean of seeds {sorted({r['seed'] for r in rows if r['stage'] == 'diagnostic'})}).",
        "",
        "| effective rate | mu=0.9 loss | mu=0 loss | mu=0.9 acc (%) | mu=0 acc (%) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for eff in MOMENTUM_DIAG_RATES:
        a, b = (f"momentum_diag_eff{eff:g}_mu{mu:g}" for mu in (MOMENTUM, 0.0))
        la, lb = (statistics.fmean(_accs(rows, x, "train_loss")) for x in (a, b))
        aa, ab = (statistics.fmean(_accs(rows, x)) for x in (a, b))
        tag = "large" if eff == max(MOMENTUM_DIAG_RATES) else "small"
        summary[f"mnist1d_momentum_{tag}_rate_train_loss_ratio"] = la / lb
        lines.append(f"| {eff:g} | {la:.4f} | {lb:.4f} | {100 * aa:.2f} | {100 * ab:.2f} |")
    return "\n".join(lines) + "\n"


def _plot(curves: Mapping[str, Mapping[str, Any]]) -> Callable[[Any], None]:
    arms = ("two_regime", "two_regime_sgd", *SCHEDULE_ARMS, "small_only", "large_only")

    def plot(fig: Any) -> None:
        fig.set_size_inches(13, 7)
        names = list(curves)
        for j, name in enumerate(names):
            rows = curves[name]["rows"]
            ax_acc = fig.add_subplot(2, len(names), j + 1)
            ax_loss = fig.add_subplot(2, len(names), len(names) + j + 1)
            for i, arm in enumerate(arms):
                hist = [r["history"] for r in rows if r["arm"] == arm]
                if not hist:
                    continue
                ep = [h["epoch"] for h in hist[0]]
                acc = np.mean([[h["test_accuracy"] for h in hs] for hs in hist], 0)
                loss = np.mean([[h["train_loss"] for h in hs] for hs in hist], 0)
                style = {"color": f"C{i}", "lw": 2.2 if arm == "two_regime" else 1.2, "ms": 2}
                style["marker"] = "o"
                ax_acc.plot(ep, 100 * acc, label=arm, **style)
                ax_loss.semilogy(ep, loss, **style)
            for ax in (ax_acc, ax_loss):
                ax.axvline(LARGE_FRACTION * curves[name]["epochs"], color="0.5", ls="--", lw=0.8)
            ax_acc.set_title(f"{name} (dashed: two-regime switch)")
            ax_acc.set_ylabel("test accuracy (%)")
            ax_loss.set_ylabel("train loss (CE)")
            ax_loss.set_xlabel("epoch")
            top = max(100 * np.mean([r["final_accuracy"] for r in rows]), 1.0)
            ax_acc.set_ylim(max(0.0, top - 30), min(100.0, top + 15))
            for ax in (ax_acc, ax_loss):
                ax.grid(alpha=0.3)
        fig.axes[0].legend(fontsize=7)
        fig.suptitle("Two regimes vs tuned schedules (mean over final seeds)")

    return plot


# ----------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the two-regimes benchmark and writes its results.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """
    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=FULL_SEEDS)
    tuning_seeds = TUNING_SEEDS[:1] if args.quick else TUNING_SEEDS
    chunk = 8 if args.quick else CHUNK
    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    summary: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    tables, curves, selected, sizes = [], {}, {}, {}
    for name, (prefix, full_epochs) in DATASETS.items():
        epochs = args.epochs or (1 if args.quick else full_epochs)
        runner = _Runner(name, epochs, chunk, args.quick)
        chosen, tried, tune_rows = _tune(runner, args.quick, tuning_seeds)
        ablations = name == "mnist1d"
        rows = runner.run(_final_specs(chosen, seeds, ablations))
        s, table = _summarize(prefix, [r for r in rows if r["stage"] == "final"], tried, runner)
        summary.update(s)
        if ablations:
            table += "\n" + _ablation_md(rows, runner, summary)
        tables.append(table)
        runs += tune_rows + rows
        curves[name] = {"rows": [r for r in rows if r["stage"] == "final"], "epochs": epochs}
        selected[name] = {a: {**c, "drops": list(c["drops"])} for a, c in chosen.items()}
        for c in selected[name].values():
            c["fraction"] = None if math.isinf(c["fraction"]) else c["fraction"]
        sizes[name] = {**runner.sizes, "epochs": epochs, "updates": runner.total}
    met = sum(bool(summary[p + "goal_met"]) for p, _ in DATASETS.values())
    summary["goal_met_sets"] = met
    summary["goal_met"] = met >= 2
    summary["wall_time_s"] = time.perf_counter() - t_start
    summary["cpu_time_s"] = time.process_time() - cpu_start
    summary["load_average_start"] = load_start
    summary["load_average_end"] = os.getloadavg()[0]
    summary["num_runs"] = len(runs)
    config = {
        "model": f"MLP {FEATURES} ReLU",
        "datasets": sizes,
        "batch_size": BATCH_SIZE,
        "weight_decay": WEIGHT_DECAY,
        "validation_fraction": VAL_FRACTION,
        "tuning_seeds": list(tuning_seeds),
        "seeds": seeds,
        "grids": {a: _grid(a, args.quick) for a in TUNED_ARMS},
        "selected": selected,
        "small_tx": f"adam({SMALL_LR})",
        "large_fraction": LARGE_FRACTION,
        "vmap_chunk": chunk,
        "selection": "each tuned arm: highest mean validation accuracy over the tuning seeds; "
        "best schedule: highest mean test accuracy of step/cosine/one-cycle over final seeds",
    }
    notes = (
        "Test accuracy mean ± std over the final seeds "
        f"{seeds} (tuning seeds {list(tuning_seeds)} chose each tuned arm's config on "
        f"{int(VAL_FRACTION * 100)}% held-out validation data). 'vs two-regime' is the paired "
        "mean difference (arm minus two-regime). Final train loss: mean minibatch cross-entropy "
        "of the last epoch. Runs are vmapped in chunks, so per-run time is amortized: "
        f"{summary['wall_time_s']:.0f} s wall in all, compile included, and "
        f"{summary['cpu_time_s']:.0f} s of CPU time (so about "
        f"{summary['cpu_time_s'] / 2:.0f} s on 2 dedicated cores); the 1-minute load average "
        f"was {load_start:.1f} at the start and {summary['load_average_end']:.1f} at the end "
        "(other jobs shared the machine).\n\n"
        "Scale, shrunk to fit about 8 minutes on 2 cores: epochs "
        + ", ".join(f"{n} {v['epochs']}" for n, v in sizes.items())
        + " (a fuller run: 60 on mnist1d, 30 on MNIST); ablations on mnist1d only.\n\n"
        f"Goal met on {met} of 3 data sets.\n\n" + _verdict(summary)
    )
    harness.write_results(
        NAME,
        args=args,
        config=config,
        runs=runs,
        summary=summary,
        claim_md=CLAIM,
        table_md=notes + "\n\n" + "\n".join(tables),
        plot=_plot(curves),
        argv=argv,
    )
    return summary


if __name__ == "__main__":
    main()
