"""Weight update skipping (WUS, WUS+LR) against plain training, in the paper's regime.

The paper's models are AlexNet-, VGG- and ResNet-style convolutional networks. Here: one
VGG-style CNN (:class:`VGG`: stages of 3x3 convolutions with biases, each stage closed by a
2x2 max-pool, flattened into the head), sized so that a full step of a batch of 128 takes
about 10 ms on 2 CPU cores, on the 5,000-digit MNIST subset. Every arm goes through the
comparison protocol (:mod:`benchmarks.protocol`):

1. **What a window can save, first.** The compiled FLOPs (``PhasedStep.flops``) and the
   interleaved timings (rounds in a random order, medians of per-round ratios, as
   ``benchmarks.step_cost`` times them) of WUS's full and bias-only step programs: the
   bias-only FLOP ratio and the bias-only step time ratio rho. A run that skips a fraction f
   of its steps is predicted to take ``1 - (1 - rho) f`` of the baseline's time.
2. **Selection on validation** (two seeds, the same number N of configurations per selected
   arm, final-epoch validation accuracy): ``baseline`` (SGD with momentum, the rate
   cosine-decayed to 0 over the budget) selects its step size; ``wus`` and ``wuslr`` wrap the
   baseline's chosen optimizer and select the decision signal (the in-graph minibatch
   training accuracy, or the last epoch's validation accuracy), the threshold, the window and
   the patience; ``baseline_equal_time`` (and ``baseline_equal_time_wuslr``) select the step
   size of the baseline trained for as many steps as fit in WUS's (WUS+LR's) measured mean
   train time, the schedule fitted to those steps. Controls inherit a choice:
   ``random_windows`` takes WUS's, with its windows at random epochs after the warmup and the
   skipped steps of that seed's WUS run (the monitor off); ``baseline_half_budget`` takes the
   baseline's, at half the steps (schedule fitted), checked on validation first. Selection
   runs go through ``optax_multirate.fit`` too, one at a time, not through the batched
   runner: on XLA CPU a ``lax.scan`` over this CNN's train step (the batched runner's loop)
   took about 5 times the CPU time per step of the jitted step called from Python, vmapped
   or not, and vmapping convolutions over runs cost 1.6 to 2.6 times more per run again.
3. **Final runs**: the chosen configurations on 10 paired seeds, seed-major, each through
   ``optax_multirate.fit`` with the phased step (window steps differentiate the biases only);
   the sealed test split is read there only.

Run: ``python -m benchmarks.wus`` (full) or ``--quick`` (8x8 digits, a tiny CNN, one seed,
two configurations per arm, two epochs: the code path only).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness, protocol
from benchmarks.step_cost import _time_rounds
from optax_multirate import _checks
from optax_multirate.data import Split, load_dataset, num_batches
from optax_multirate.models import max_pool_2x2
from optax_multirate.train import Callback, Evaluate, UpdateExtras, fit, init_model, make_train_step
from optax_multirate.wus import WusState, wus, wus_labels

logger = logging.getLogger(__name__)

NAME = "wus"
BATCH_SIZE = 128
MOMENTUM = 0.9
WARMUP = 3  # epochs before a window may open (wus's default)
LR_FACTOR = 0.5  # WUS+LR: every update scaled by 0.5 more at each window opening
PAPER_TIME_RATIO = 0.46  # WUS on CIFAR-10, CPU: 54% less training time
STAGES = ((6,), (12,), (24, 24))  # channels of the 3x3 convs of each stage; a max-pool after each
FULL_EPOCHS = 16  # halving it costs the baseline >= 1 pt of validation accuracy (checked)
TIMING_ROUNDS = 100
LEARNING_RATES = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)  # most conservative first
# WUS's own hyperparameters, (signal, threshold, window, patience), most conservative first
# (the fewest skipped steps): N = len(LEARNING_RATES) configurations, as the baseline's.
WUS_GRID = (
    ("train_accuracy", 0.005, 2, 2),
    ("train_accuracy", 0.005, 4, 1),
    ("train_accuracy", 0.01, 2, 2),
    ("train_accuracy", 0.01, 4, 1),
    ("val_accuracy", 0.005, 2, 2),
    ("val_accuracy", 0.005, 4, 1),
    ("val_accuracy", 0.01, 2, 2),
    ("val_accuracy", 0.01, 4, 1),
)
# --quick: the code path, not the figures
QUICK_STAGES = ((4,), (8,))
QUICK_BATCH_SIZE = 32
QUICK_EPOCHS = 2
QUICK_WARMUP = 1
QUICK_TIMING_ROUNDS = 3
QUICK_LEARNING_RATES = (0.1, 0.2)
QUICK_WUS_GRID = (("train_accuracy", 0.005, 1, 1), ("val_accuracy", 0.005, 1, 1))

SIGNALS = ("train_accuracy", "val_accuracy")
HALF_BUDGET_MIN_COST_PT = 1.0  # halving the baseline's budget should cost this much on validation

CLAIM = (
    "Safayenikoo & Akturk (arXiv 2012.02792; IEEE JETCAS 2021): skipping weight updates while "
    "the accuracy's change is minuscule, biases still trained, cuts training time by 54% (WUS) "
    "and 50% (WUS+LR) on CIFAR-10 (time ratios 0.46 / 0.50) and 43% / 35% on CIFAR-100 (CPU; "
    "averages over AlexNet, VGG-11/16, ResNet-18), 22% / 21% on GPU, with accuracy "
    "'virtually the same'. Our goal: WUS skips at least half of the steps "
    "(`skipped_step_fraction` >= 0.5) at `accuracy_delta_pt` >= -1.0 (its 95% interval's low "
    "end >= -1.5), its `time_ratio` within 0.03 of the cost model's `predicted_time_ratio` "
    "(1 - (1 - rho) f), and `equal_time_accuracy_delta_pt` >= 0 (WUS at least as accurate as "
    "the baseline trained for the same time)."
)


class VGG(nn.Module):
    """A VGG-style CNN: stages of 3x3 convolutions, each stage closed by a 2x2 max-pool.

    Every convolution has a bias and a ReLU; the pool is
    :func:`optax_multirate.models.max_pool_2x2` (its derivative rule makes the pool's backward
    pass cheap on XLA CPU, so a bias-only step is not dominated by it). The last pool's output
    is flattened into the ``head``. Names follow ``optax_multirate.models.CNN``: ``Conv_0``,
    ``Conv_1``, ... in order, then ``head``.

    Attributes:
      stages: the output channels of each convolution, per stage.
      num_classes: width of the head.
    """

    stages: Sequence[Sequence[int]] = STAGES
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        del train  # no dropout, no batch norm
        if x.ndim == 3:
            x = x[..., None]
        i = 0
        for stage in self.stages:
            for c in stage:
                x = nn.relu(nn.Conv(c, (3, 3), padding="SAME", name=f"Conv_{i}")(x))
                i += 1
            x = max_pool_2x2(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="head")(x)


# --------------------------------------------------------------------------- transformations


def make_tx(
    *,
    steps: int,
    steps_per_epoch: int,
    learning_rate: float | jax.Array,
    schedule: str = "cosine",
    signal: str | None = None,
    threshold: float | jax.Array = 0.0,
    window: int = 1,
    patience: int = 1,
    lr_factor: float | jax.Array | None = None,
    warmup: int = WARMUP,
    force_windows: Sequence[int] | None = None,
) -> optax.GradientTransformation:
    """The optimizer of one configuration: the baseline's SGD, or WUS inside it.

    The baseline (``signal=None`` and no ``force_windows``) is ``optax.sgd`` with momentum,
    its step size ``learning_rate`` on ``schedule`` fitted to ``steps``
    (:func:`protocol.fitted_schedule`). A WUS arm is the same chain,
    ``trace(momentum)`` then ``scale_by_learning_rate(schedule)``, with ``wus`` around the
    momentum (one decision per epoch: ``accumulation_size=steps_per_epoch``): a window holds
    the weights and their momentum, while the schedule runs on the global step, as a
    framework's learning-rate scheduler does (inside ``wus`` its step count would be held
    too, and a run with windows would end before its rate had decayed). Without windows both
    are the same numbers. ``lr_factor`` makes it WUS+LR; ``force_windows`` with
    ``threshold=0`` is the random-window control.
    """
    sched = protocol.fitted_schedule({"learning_rate": learning_rate, "schedule": schedule}, steps)
    if signal is None and force_windows is None:
        return optax.sgd(sched, momentum=MOMENTUM)
    held = wus(
        optax.trace(decay=MOMENTUM),
        param_labels=wus_labels,
        threshold=threshold,
        window=window,
        accumulation_size=steps_per_epoch,
        lr_factor=lr_factor,
        patience=patience,
        warmup=warmup,
        force_windows=force_windows,
    )
    return optax.chain(held, optax.scale_by_learning_rate(sched))


def _train_signal(metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The in-graph signal: the minibatch training accuracy of each step."""
    return {"value": metrics["accuracy"]}


def _last_val_accuracy(loop: Any) -> dict[str, float]:
    """The host-side signal: the validation accuracy after the last epoch (nan before one)."""
    return {"value": loop.history[-1]["val_accuracy"] if loop.history else math.nan}


class _WindowLog(Callback):
    """Writes WUS's counters (skipped steps, windows, lr scale) into each epoch's row."""

    def on_epoch_end(self, loop: Any, row: dict[str, Any]) -> None:
        s = jax.device_get(_checks.find_state("opt_state", loop.state.opt_state, WusState))
        row.update(
            skipped_steps=int(s.skipped_steps), windows=int(s.windows), lr_scale=float(s.lr_scale)
        )


class _CloseBudget(Callback):
    """Closes a run that a step budget stopped inside an epoch: its row, then its evaluation."""

    def __init__(self, evaluate: Evaluate, window_log: _WindowLog | None):
        self.evaluate, self.window_log = evaluate, window_log

    def on_train_end(self, loop: Any) -> None:
        if loop.state.batch:
            row = loop.end_epoch()
            self.evaluate.on_epoch_end(loop, row)
            if self.window_log is not None:
                self.window_log.on_epoch_end(loop, row)


def _callbacks(
    config: Mapping[str, Any], splits: Mapping[str, Any], *, windows: bool, every: int
) -> tuple[list[Callback], Callable | None]:
    """The callbacks and the step's in-graph extras of a run of ``config``."""
    signal = config.get("signal")
    evaluate = Evaluate(splits, every_epochs=1 if signal == "val_accuracy" else every)
    log = _WindowLog() if windows else None
    callbacks: list[Callback] = [evaluate, *([log] if log else []), _CloseBudget(evaluate, log)]
    if signal == "val_accuracy":
        callbacks.append(UpdateExtras(_last_val_accuracy))
    return callbacks, (_train_signal if signal == "train_accuracy" else None)


def _median(xs: Sequence[float]) -> float | None:
    return harness.median_ms(xs) if xs else None


def fit_run(
    model: nn.Module,
    config: Mapping[str, Any],
    train: Split,
    splits: Mapping[str, Any],
    *,
    seed: int,
    steps: int,
    steps_per_epoch: int,
    batch_size: int = BATCH_SIZE,
    warmup: int = WARMUP,
    step_cache: dict[str, Any] | None = None,
    eval_every: int = 1,
) -> dict[str, Any]:
    """One run of ``config`` for ``steps`` steps through ``optax_multirate.fit``.

    ``splits`` (``{"val": ..., "test": ...}``) are evaluated after every ``eval_every``
    epochs and at the end (every epoch when the validation accuracy is the decision signal),
    outside the train time. A fresh train step is built for each run (its compile time is the
    run's), unless ``step_cache`` keeps one per configuration (selection runs).

    Returns:
      ``final_accuracy`` (the last row's ``test_accuracy``, or nan), ``val_accuracy`` (the
      last row's, where evaluated), ``train_time_s``, ``compile_time_s``, ``steps``, ``history``,
      the median full and window step times, and WUS's counters for WUS arms.
    """
    tx = make_tx(steps=steps, steps_per_epoch=steps_per_epoch, warmup=warmup, **config)
    is_wus = config.get("signal") is not None or config.get("force_windows") is not None
    callbacks, extra_args_fn = _callbacks(config, splits, windows=is_wus, every=eval_every)
    key = json.dumps(dict(config), sort_keys=True)
    if step_cache is not None and key in step_cache:
        tx, step = step_cache[key]
    else:
        step = make_train_step(model, tx, extra_args_fn=extra_args_fn)
        if step_cache is not None:
            step_cache[key] = (tx, step)
    res = fit(
        model,
        tx,
        train,
        epochs=-(-steps // steps_per_epoch),
        seed=seed,
        batch_size=batch_size,
        step=step,
        callbacks=callbacks,
        max_steps=steps,
    )
    last = res.history[-1]
    window_ms = [t for k, ts in res.step_times_ms.items() if k != "full" for t in ts]
    out: dict[str, Any] = {
        **protocol.run_record(res, step_times=None),  # final_accuracy: the last test_accuracy
        "num_compiles": res.num_compiles,
        "median_full_step_ms": _median(res.step_times_ms.get("full", [])),
        "median_window_step_ms": _median(window_ms),
    }
    if "val_accuracy" in last:
        out["val_accuracy"] = float(last["val_accuracy"])
    if is_wus:
        skipped = int(last["skipped_steps"])
        per_epoch = np.diff([0] + [int(h["skipped_steps"]) for h in res.history])
        out.update(
            skipped_steps=skipped,
            skipped_fraction=skipped / max(res.steps, 1),
            windows=int(last["windows"]),
            lr_scale=float(last["lr_scale"]),
            window_epochs=[int(n > 0) for n in per_epoch],
        )
    return out


# ----------------------------------------------------------------------------- step costs


def step_costs(
    model: nn.Module,
    train: Split,
    *,
    steps_per_epoch: int,
    rounds: int,
    batch_size: int = BATCH_SIZE,
) -> dict[str, Any]:
    """FLOPs and interleaved step timings of WUS's full and bias-only step programs.

    The programs are those a WUS run calls (the train step of ``wus`` around SGD with
    momentum, one batch of ``batch_size``), each called directly; each round calls both once
    in a random order (``benchmarks.step_cost``), and the ratio is the median of the per-round
    ratios with its order-statistic 95% interval (:func:`harness.paired_ratio`).

    Returns:
      ``flops``, ``median_ms`` and ``times_ms`` per program, ``bias_only_flop_ratio``,
      ``bias_only_step_time_ratio`` with ``..._ci_low`` / ``..._ci_high``, ``rounds``.
    """
    x = train.x[:batch_size]
    params, model_state = init_model(model, jax.random.PRNGKey(0), x[:1])
    config = {"learning_rate": 0.05, "signal": "train_accuracy", "threshold": 0.005, "window": 2}
    tx = make_tx(steps=100, steps_per_epoch=steps_per_epoch, **config)
    step = make_train_step(model, tx, extra_args_fn=_train_signal)
    opt_state = tx.init(params)
    labels = jax.tree.leaves(wus_labels(params))
    masks = {"full": (True,) * len(labels), "bias_only": tuple(lab == "bias" for lab in labels)}
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(train.y[:batch_size])}
    args = (model_state, batch, jax.random.PRNGKey(0))
    flops = {k: step.phased.flops(m, params, opt_state, *args) for k, m in masks.items()}
    fns = {
        k: functools.partial(step.phased.program(m), params, opt_state, args, {})
        for k, m in masks.items()
    }
    times = _time_rounds(fns, rounds)
    rho, low, high = harness.paired_ratio(times["bias_only"], times["full"])
    return {
        "flops": flops,
        "median_ms": {k: harness.median_ms(v) for k, v in times.items()},
        "times_ms": times,
        "bias_only_flop_ratio": flops["bias_only"] / flops["full"],
        "bias_only_step_time_ratio": rho,
        "bias_only_step_time_ratio_ci_low": low,
        "bias_only_step_time_ratio_ci_high": high,
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------------- selection


class _Setup:
    """What every stage of the benchmark shares: model, splits, budget, grids."""

    def __init__(self, args: Any, seeds: list[int]):
        self.quick = bool(args.quick)
        self.epochs = harness.epochs_from_args(args, full=FULL_EPOCHS, quick=QUICK_EPOCHS)
        self.seeds = seeds
        self.data = load_dataset("digits" if self.quick else "mnist_subset")
        self.splits = protocol.three_splits(self.data)
        self.train, self.val = self.splits.train, self.splits.validation
        self.num_classes = self.data.num_classes
        self.batch_size = QUICK_BATCH_SIZE if self.quick else BATCH_SIZE
        self.spe = num_batches(self.train, self.batch_size)
        self.steps = self.epochs * self.spe
        self.half_steps = protocol.half_budget(self.steps)
        stages = QUICK_STAGES if self.quick else STAGES
        self.model = VGG(stages=stages, num_classes=self.num_classes)
        self.warmup = QUICK_WARMUP if self.quick else WARMUP
        self.rounds = QUICK_TIMING_ROUNDS if self.quick else TIMING_ROUNDS
        self.learning_rates = QUICK_LEARNING_RATES if self.quick else LEARNING_RATES
        self.wus_grid = QUICK_WUS_GRID if self.quick else WUS_GRID
        if len(self.wus_grid) != len(self.learning_rates):
            raise ValueError("every selected arm must have the same number N of configurations")
        self.n = len(self.learning_rates)

    def outcome(self, steps: int) -> Callable[[dict[str, Any], int], protocol.RunOutcome]:
        """``run(config, seed)`` for :func:`protocol.select`: a ``fit`` run of ``steps`` steps.

        One train step per configuration serves both seeds (their compile is not measured);
        the validation split is evaluated at the end (every epoch where it is the signal).
        """
        cache: dict[str, Any] = {}

        def run(config: dict[str, Any], seed: int) -> protocol.RunOutcome:
            r = self.run(config, seed, {"val": self.val}, steps=steps, step_cache=cache,
                         eval_every=self.epochs + 1)  # fmt: skip
            losses = tuple(h["train_loss"] for h in r["history"])
            return protocol.RunOutcome(r["val_accuracy"], losses)

        return run

    def select(self, arm: str, grid: Sequence[Mapping[str, Any]], run: Callable) -> dict:
        return protocol.select(arm, grid, run, final_seeds=self.seeds,
                               num_classes=self.num_classes, budget=self.n)  # fmt: skip

    def run(self, config: Mapping[str, Any], seed: int, splits: Mapping[str, Any], **kw: Any):
        kw.setdefault("steps", self.steps)
        return fit_run(self.model, config, self.train, splits, seed=seed, steps_per_epoch=self.spe,
                       batch_size=self.batch_size, warmup=self.warmup, **kw)  # fmt: skip


def _select_step_size(setup: _Setup, arm: str, steps: int) -> dict[str, Any]:
    """An arm of the plain optimizer that selects its step size for a budget of ``steps``."""
    grid = [{"learning_rate": lr, "schedule": "cosine"} for lr in setup.learning_rates]
    return setup.select(arm, grid, setup.outcome(steps))


def _select_wus(setup: _Setup, arm: str, base: Mapping[str, Any], lr_factor: float | None):
    """WUS (WUS+LR) around the baseline's choice ``base``: signal, threshold, window, patience."""
    extra = {} if lr_factor is None else {"lr_factor": lr_factor}
    grid = [
        {**base, "signal": s, "threshold": th, "window": w, "patience": p, **extra}
        for s, th, w, p in setup.wus_grid
    ]
    return setup.select(arm, grid, setup.outcome(setup.steps))


def _half_budget_check(setup: _Setup, rec: Mapping[str, Any]) -> float | None:
    """The baseline's chosen configuration at half the steps minus at the full budget, in
    points of validation accuracy over the selection seeds (None if the baseline diverged)."""
    if rec["chosen"] is None:
        return None
    run = setup.outcome(setup.half_steps)
    half = [run(dict(rec["chosen"]), seed).val_accuracy for seed in protocol.SELECTION_SEEDS]
    full = rec["scores"][rec["grid"].index(rec["chosen"])]
    return 100.0 * (statistics.fmean(half) - full)


def _random_windows(
    rng: np.random.Generator, skipped: int, window: int, warmup: int, epochs: int
) -> tuple[int, ...]:
    """Window-opening periods, at random after ``warmup``, skipping ``skipped`` epochs in all.

    A window opened at the end of period ``p`` skips epochs ``p .. p + window - 1`` (0-based);
    a remainder shorter than ``window`` is a window at the end, cut by the end of training.
    Windows are at least one full epoch apart, as the monitor's are.
    """
    warmup = max(warmup, 1)  # a window opens at the end of a period, the first at 1
    n, rest = divmod(skipped, window)
    end = epochs - rest if rest else epochs
    opens = [] if not rest else [epochs - rest]
    last = end - window - (1 if rest else 0)  # n starts in [warmup, last], window + 1 apart
    if n == 0:
        return tuple(opens)
    free = max(0, last - warmup - (n - 1) * (window + 1))  # >= 0: the wus run is a solution
    offsets = np.sort(rng.integers(0, free + 1, size=n))
    opens += [int(warmup + o + i * (window + 1)) for i, o in enumerate(offsets)]
    return tuple(sorted(opens))


# --------------------------------------------------------------------------------- final runs


def _final_arms(setup: _Setup) -> dict[str, Callable]:
    """``{arm: fn(config, seed, test)}`` of the main final runs, in their per-seed order."""
    wus_skipped: dict[int, int] = {}

    def plain(steps: int) -> Callable:
        return lambda config, seed, test: setup.run(config, seed, {"test": test}, steps=steps)

    def method(config: dict, seed: int, test: Split) -> dict:
        val = {"val": setup.val} if config["signal"] == "val_accuracy" else {}
        return setup.run(config, seed, {**val, "test": test})

    def wus_run(config: dict, seed: int, test: Split) -> dict:
        r = method(config, seed, test)
        wus_skipped[seed] = round(r["skipped_steps"] / setup.spe)
        return r

    def random_run(config: dict, seed: int, test: Split) -> dict:
        rng = np.random.default_rng([seed, 1])
        force = _random_windows(rng, wus_skipped[seed], config["window"], setup.warmup,
                                setup.epochs)  # fmt: skip
        cfg = {k: v for k, v in config.items() if k not in ("signal", "threshold", "patience")}
        r = setup.run({**cfg, "threshold": 0.0, "force_windows": force}, seed, {"test": test})
        return {**r, "force_windows": list(force)}

    return {
        "baseline": plain(setup.steps),
        "wus": wus_run,
        "wuslr": method,
        "random_windows": random_run,
        "baseline_half_budget": plain(setup.half_steps),
    }


# ------------------------------------------------------------------------------------ summary


def _arm_runs(runs: Sequence[Mapping[str, Any]], arm: str) -> list[Mapping[str, Any]]:
    return [r for r in runs if r["arm"] == arm]


def _mean_of(runs: Sequence[Mapping[str, Any]], arm: str, key: str) -> float | None:
    vals = [r[key] for r in _arm_runs(runs, arm) if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _put_delta(summary: dict, key: str, runs: Sequence[Mapping[str, Any]], arm: str, ref: str):
    """``arm - ref`` per seed with its interval, or None where an arm has no runs."""
    if _arm_runs(runs, arm) and _arm_runs(runs, ref):
        protocol.put_delta(summary, key, protocol.paired_deltas_pt(runs, arm, ref))
    else:
        summary[key] = None
        summary.update(dict.fromkeys(protocol.ci_keys(key)))


def _step_ms(runs: Sequence[Mapping[str, Any]], arm: str, key: str) -> float | None:
    vals = [r[key] for r in _arm_runs(runs, arm) if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def summarize(
    runs: Sequence[Mapping[str, Any]], costs: Mapping[str, Any], half_val_delta: float | None
) -> dict[str, Any]:
    """The summary: time and accuracy of WUS and WUS+LR against the baseline and controls."""
    rho = costs["bias_only_step_time_ratio"]
    s: dict[str, Any] = {}
    for prefix, arm, equal in (
        ("", "wus", "baseline_equal_time"),
        ("wuslr_", "wuslr", "baseline_equal_time_wuslr"),
    ):
        ok = bool(_arm_runs(runs, arm)) and bool(_arm_runs(runs, "baseline"))
        s[prefix + "time_ratio"] = protocol.time_ratio(runs, arm, "baseline") if ok else None
        s[prefix + "time_ratio_with_compile"] = (
            protocol.time_ratio_with_compile(runs, arm, "baseline") if ok else None
        )
        _put_delta(s, prefix + "accuracy_delta_pt", runs, arm, "baseline")
        _put_delta(s, prefix + "equal_time_accuracy_delta_pt", runs, arm, equal)
        f = _mean_of(runs, arm, "skipped_fraction")
        s[prefix + "skipped_step_fraction"] = f
        s[prefix + "predicted_time_ratio"] = None if f is None else 1.0 - (1.0 - rho) * f
        full_ms = _step_ms(runs, arm, "median_full_step_ms")
        s[prefix + "window_step_time_ratio"] = _ratio(
            _step_ms(runs, arm, "median_window_step_ms"), full_ms
        )
        s[prefix + "wrapper_overhead_ratio"] = _ratio(
            full_ms, _step_ms(runs, "baseline", "median_full_step_ms")
        )
    s["bias_only_step_time_ratio"] = rho
    for end in ("low", "high"):  # nan for fewer than 6 rounds: None, as undefined intervals
        v = costs[f"bias_only_step_time_ratio_ci_{end}"]
        s[f"bias_only_step_time_ratio_ci_{end}"] = None if math.isnan(v) else v
    s["bias_only_flop_ratio"] = costs["bias_only_flop_ratio"]
    s["full_step_ms"] = costs["median_ms"]["full"]
    _put_delta(s, "baseline_half_budget_delta_pt", runs, "baseline_half_budget", "baseline")
    s["baseline_half_budget_validation_delta_pt"] = half_val_delta
    _put_delta(s, "random_windows_accuracy_delta_pt", runs, "random_windows", "baseline")
    s["random_windows_skipped_step_fraction"] = _mean_of(runs, "random_windows", "skipped_fraction")
    s["baseline_accuracy"] = _mean_of(runs, "baseline", "final_accuracy")
    s["paper_time_ratio"] = PAPER_TIME_RATIO
    s["diverged_runs"] = protocol.diverged_runs(runs)
    need = ("skipped_step_fraction", "accuracy_delta_pt", "accuracy_delta_ci_low_pt",
            "time_ratio", "predicted_time_ratio", "equal_time_accuracy_delta_pt")  # fmt: skip
    s["goal_reached"] = all(s[k] is not None for k in need) and bool(
        s["skipped_step_fraction"] >= 0.5
        and s["accuracy_delta_pt"] >= -1.0
        and s["accuracy_delta_ci_low_pt"] >= -1.5
        and abs(s["time_ratio"] - s["predicted_time_ratio"]) <= 0.03
        and s["equal_time_accuracy_delta_pt"] >= 0.0
    )
    return s


# ---------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the WUS benchmark and writes its results.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """
    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=len(protocol.FINAL_SEEDS))
    setup = _Setup(args, seeds)
    t0 = time.perf_counter()
    costs = step_costs(setup.model, setup.train, steps_per_epoch=setup.spe, rounds=setup.rounds,
                       batch_size=setup.batch_size)  # fmt: skip
    logger.info("step costs: rho %.3f, FLOP ratio %.3f, full step %.2f ms",
                costs["bias_only_step_time_ratio"], costs["bias_only_flop_ratio"],
                costs["median_ms"]["full"])  # fmt: skip

    selection = {"baseline": _select_step_size(setup, "baseline", setup.steps)}
    base = selection["baseline"]["chosen"]
    if base is None:
        raise RuntimeError("every step size of the baseline diverged in selection")
    half_val_delta = _half_budget_check(setup, selection["baseline"])
    if half_val_delta is not None and half_val_delta > -HALF_BUDGET_MIN_COST_PT:
        logger.warning("halving the baseline's budget costs %.2f pt on validation (< %.1f)",
                       -half_val_delta, HALF_BUDGET_MIN_COST_PT)  # fmt: skip
    selection["wus"] = _select_wus(setup, "wus", base, None)
    selection["wuslr"] = _select_wus(setup, "wuslr", base, LR_FACTOR)
    selection["random_windows"] = protocol.inherit(selection, "wus")
    selection["baseline_half_budget"] = protocol.inherit(selection, "baseline")
    protocol.check_equal_budgets(selection)

    final = functools.partial(protocol.final_runs, test=setup.splits.test,
                              num_classes=setup.num_classes, seeds=seeds)  # fmt: skip
    runs = final(_final_arms(setup), selection)
    budgets: dict[str, protocol.StepBudget] = {}
    equal_time = {"baseline_equal_time": "wus", "baseline_equal_time_wuslr": "wuslr"}
    if setup.quick:  # the second one runs the same code; --quick stays seconds
        del equal_time["baseline_equal_time_wuslr"]
    for arm, method in equal_time.items():
        if _arm_runs(runs, method):
            budgets[arm] = protocol.equal_time_budget(runs, method, "baseline")
            selection[arm] = _select_step_size(setup, arm, budgets[arm].steps)
    protocol.check_equal_budgets(selection)
    runs += final(
        {
            arm: (lambda c, s, t, n=b.steps: setup.run(c, s, {"test": t}, steps=n))
            for arm, b in budgets.items()
        },
        selection,
    )
    wall = time.perf_counter() - t0

    summary = summarize(runs, costs, half_val_delta)
    summary["half_budget_check_passed"] = (
        half_val_delta is not None and half_val_delta <= -HALF_BUDGET_MIN_COST_PT
    )
    summary["configs_per_arm"] = setup.n
    summary["wall_time_s"] = wall
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}
    config = _config(setup, costs, budgets)
    harness.write_results(
        NAME, args=args, config=config, runs=runs, summary=summary, claim_md=CLAIM,
        table_md=_table(setup, selection, runs, summary, costs, budgets),
        plot=protocol.plot_accuracy_time(
            runs, equal_time_s=_mean_of(runs, "wus", "train_time_s"),
            equal_time_arm="baseline_equal_time",
            title="WUS on a VGG-style CNN, MNIST subset (mean, band: min-max over seeds)"),
        argv=argv, selection=selection,
    )  # fmt: skip
    logger.info("summary: %s", summary)
    return summary


def _config(setup: _Setup, costs: Mapping[str, Any], budgets: Mapping[str, Any]) -> dict:
    return {
        "model": repr(setup.model),
        "dataset": setup.data.name,
        "splits": setup.splits.record,
        "epochs": setup.epochs,
        "batch_size": setup.batch_size,
        "steps_per_epoch": setup.spe,
        "steps": setup.steps,
        "half_budget_steps": setup.half_steps,
        "equal_time_budgets": {k: b._asdict() for k, b in budgets.items()},
        "optimizer": f"optax.sgd(cosine_decay_schedule(learning_rate, steps), momentum={MOMENTUM})",
        "wus": {
            "labels": "wus_labels (every bias trains in a window)",
            "accumulation_size": "steps_per_epoch (one decision per epoch)",
            "warmup": setup.warmup,
            "signals": {
                "train_accuracy": "the minibatch training accuracy of each step, in the graph",
                "val_accuracy": "the validation accuracy after the previous epoch (UpdateExtras)",
            },
            "wuslr_lr_factor": LR_FACTOR,
            "random_windows": "threshold 0, force_windows at random epochs after the warmup "
            "(numpy default_rng([seed, 1])), as many skipped epochs as that seed's wus run",
        },
        "learning_rates": list(setup.learning_rates),
        "wus_grid": [
            dict(zip(("signal", "threshold", "window", "patience"), g)) for g in setup.wus_grid
        ],
        "configs_per_arm": setup.n,
        "selection_seeds": list(protocol.SELECTION_SEEDS),
        "seeds": setup.seeds,
        "step_costs": dict(costs),
        "half_budget_min_cost_pt": HALF_BUDGET_MIN_COST_PT,
    }


# -------------------------------------------------------------------------------------- table


def _f(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


_ci = protocol.delta_text  # mean [low, high]


def _short(config: Mapping[str, Any] | None) -> str:
    return protocol.config_text(config, hide=("schedule",))


ARM_ROWS = (  # arm, delta key against the baseline, time-ratio prefix, what it is
    ("baseline", None, None, "SGD + momentum, cosine over the full budget"),
    ("wus", "accuracy_delta_pt", "", "WUS"),
    ("wuslr", "wuslr_accuracy_delta_pt", "wuslr_", "WUS+LR"),
    ("random_windows", "random_windows_accuracy_delta_pt", None, "control: WUS's skipped "
     "epochs at random"),
    ("baseline_half_budget", "baseline_half_budget_delta_pt", None, "control: half the steps"),
    ("baseline_equal_time", None, None, "the baseline for WUS's measured time"),
    ("baseline_equal_time_wuslr", None, None, "the baseline for WUS+LR's measured time"),
)  # fmt: skip


def _table(
    setup: _Setup,
    selection: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    s: Mapping[str, Any],
    costs: Mapping[str, Any],
    budgets: Mapping[str, Any],
) -> str:
    n_seeds = len(setup.seeds)
    lines = [
        f"{setup.epochs} epochs of {setup.spe} steps (batch {setup.batch_size}) on "
        f"{len(setup.train)} training examples ({setup.data.name}, validation "
        f"{len(setup.val)} held out, stratified), {n_seeds} paired seeds, N = {setup.n} "
        "configurations per selected arm. Deltas in points of test accuracy, arm minus "
        "baseline, mean over seeds with the 95% t-interval; time ratios are mean train time "
        "(compile excluded; with compile in brackets) over the baseline's.",
        "",
        "| arm | what | chosen | steps | test accuracy | delta vs baseline (pt) | time ratio "
        "| skipped steps | diverged runs |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm, key, prefix, what in ARM_ROWS:
        rs = _arm_runs(runs, arm)
        if arm not in selection:
            continue
        chosen = _short(selection[arm]["chosen"])
        if not rs:
            lines.append(f"| {arm} | {what} | {chosen} | | no final runs | | | | |")
            continue
        acc, std = harness.mean_std([r["final_accuracy"] for r in rs])
        delta = _ci(s, key) if key else ""
        if arm in budgets:
            delta = f"method minus this: {_ci(s, _EQUAL_TIME_KEYS[arm])}"
        if prefix is None:
            tr = _f(protocol.time_ratio(runs, arm, "baseline"))
        else:
            tr = f"{_f(s[prefix + 'time_ratio'])} ({_f(s[prefix + 'time_ratio_with_compile'])})"
        skipped = _f(_mean_of(runs, arm, "skipped_fraction"))
        div = sum(bool(r["diverged"]) for r in rs)
        lines.append(
            f"| {arm} | {what} | {chosen} | {rs[0]['steps']} | {acc:.4f} ± {std:.4f} | {delta} "
            f"| {tr} | {skipped} | {div} |"
        )
    c = costs
    lines += [
        "",
        "**What a window step costs** (measured first; WUS's step programs on one batch, "
        f"{c['rounds']} rounds, each calling both programs once in a random order; the ratio "
        "is the median of the per-round ratios, 95% order-statistic interval in brackets; "
        "FLOPs from XLA's `cost_analysis`):",
        "",
        "| program | FLOPs | FLOP ratio | median ms | time ratio (rho) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| full | {c['flops']['full']:.3g} | 1 | {c['median_ms']['full']:.2f} | 1 |",
        f"| bias-only | {c['flops']['bias_only']:.3g} | {c['bias_only_flop_ratio']:.3f} | "
        f"{c['median_ms']['bias_only']:.2f} | {c['bias_only_step_time_ratio']:.3f} "
        f"[{c['bias_only_step_time_ratio_ci_low']:.3f}, "
        f"{c['bias_only_step_time_ratio_ci_high']:.3f}] |",
        "",
        "**The cost model against the measurement.**",
        "",
        "| | skipped fraction f | predicted 1 - (1 - rho) f | measured time ratio | window / full "
        "step in the runs | WUS full step / baseline step |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, p in (("WUS", ""), ("WUS+LR", "wuslr_")):
        lines.append(
            f"| {name} | {_f(s[p + 'skipped_step_fraction'])} | "
            f"{_f(s[p + 'predicted_time_ratio'])} | {_f(s[p + 'time_ratio'])} | "
            f"{_f(s[p + 'window_step_time_ratio'])} | {_f(s[p + 'wrapper_overhead_ratio'])} |"
        )
    lines += [
        "",
        "**The paper's claim beside ours.**",
        "",
        "| | paper (CIFAR-10, CPU) | ours |",
        "| --- | ---: | ---: |",
        f"| WUS time ratio | {PAPER_TIME_RATIO} | {_f(s['time_ratio'])} |",
        f"| WUS+LR time ratio | 0.50 | {_f(s['wuslr_time_ratio'])} |",
        f"| WUS accuracy delta (pt) | 'virtually the same' | {_ci(s, 'accuracy_delta_pt')} |",
        f"| WUS+LR accuracy delta (pt) | 'virtually the same' | "
        f"{_ci(s, 'wuslr_accuracy_delta_pt')} |",
        f"| lowest time ratio bias-only windows allow (every step skipped: rho) | | "
        f"{_f(s['bias_only_step_time_ratio'])} |",
        "",
        f"Budget check on validation (selection seeds): halving the baseline's steps changes "
        f"its validation accuracy by {_f(s['baseline_half_budget_validation_delta_pt'], '+.2f')}"
        f" pt (wanted: at most -{HALF_BUDGET_MIN_COST_PT} pt): "
        f"{'passed' if s['half_budget_check_passed'] else 'NOT passed'}. On test: "
        f"{_ci(s, 'baseline_half_budget_delta_pt')} pt.",
        "",
        "Goal (`skipped_step_fraction` >= 0.5, `accuracy_delta_pt` >= -1.0 with its interval's "
        "low end >= -1.5, `time_ratio` within 0.03 of `predicted_time_ratio`, "
        f"`equal_time_accuracy_delta_pt` >= 0): "
        f"{'reached' if s['goal_reached'] else 'NOT reached'}.",
        "",
        "**Selection** (final-epoch validation accuracy on the selection seeds "
        f"{list(protocol.SELECTION_SEEDS)}, the score their mean; `diverged` where a seed "
        "diverged; the chosen configuration in bold):",
        "",
        protocol.selection_table(selection, hide=("schedule",)),
    ]
    return "\n".join(lines)


_EQUAL_TIME_KEYS = {
    "baseline_equal_time": "equal_time_accuracy_delta_pt",
    "baseline_equal_time_wuslr": "wuslr_equal_time_accuracy_delta_pt",
}


if __name__ == "__main__":
    main()
