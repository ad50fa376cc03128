"""The fair-comparison protocol of every benchmark that compares arms.

A figure says something about a method only if every arm had the same chance. This module is
the one place where that is decided, on top of :mod:`benchmarks.harness`:

* **Three splits** (:func:`three_splits`): a seeded, stratified validation split of 15% of the
  training data; the test split comes back sealed (:class:`SealedSplit`): reading its ``x`` or
  ``y`` raises anywhere but inside :func:`final_runs`.
* **Per-arm selection under one budget** (:func:`select`): each arm runs every configuration
  of its grid on two selection seeds, disjoint from the final seeds, and keeps the best mean
  final-epoch validation accuracy (ties to the earlier, more conservative entry; a
  configuration that diverged on any seed is never chosen). :func:`check_equal_budgets` makes
  sure every selected arm tried the same number N of configurations; a control inherits
  another arm's choice (:func:`inherit`); :func:`selection_table` shows the records.
* **Divergence** (:func:`is_diverged`, :func:`diverged_runs`): a non-finite loss, or a last
  epoch's mean training loss at or above ``0.9 * ln(num_classes)``; flagged, never averaged
  in silently.
* **Final runs and intervals** (:func:`final_runs`, :func:`run_record`,
  :func:`paired_deltas_pt`, :func:`put_delta`): 10 paired seeds, interleaved seed-major;
  per-seed deltas in percentage points with a 95% t-interval beside each delta key.
* **Time controls** (:func:`equal_time_budget`, :func:`half_budget`, :func:`fitted_schedule`,
  :func:`time_ratio`, :func:`time_ratio_with_compile`).
* **A batched runner** for selection (:func:`run_batched`): many small runs at once under
  ``jax.vmap`` over seeds and float hyperparameters.
* **A plot** of test accuracy against wall time per arm (:func:`plot_accuracy_time`).

A benchmark's ``main``, in outline::

    splits = protocol.three_splits(data)
    grid = [{"learning_rate": lr} for lr in (0.03, 0.1, 0.3)]   # most conservative first
    res = protocol.run_batched(model, make_tx, grid, protocol.SELECTION_SEEDS,
                               splits.train, splits.validation, batch_size=128, epochs=10)
    selection = {arm: protocol.select(arm, grid, res.outcome, final_seeds=seeds,
                                      num_classes=data.num_classes) for arm in ...}
    protocol.check_equal_budgets(selection)
    runs = protocol.final_runs({"baseline": run_baseline, ...}, selection, splits.test,
                               seeds=seeds, num_classes=data.num_classes)
    protocol.put_delta(summary, "accuracy_delta_pt",
                       protocol.paired_deltas_pt(runs, "method", "baseline"))
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import optax

from benchmarks import harness
from benchmarks.harness import ci_keys, delta_text, number  # re-exported: the protocol's names
from optax_multirate import _checks
from optax_multirate.data import Split, validation_split

__all__ = [
    "VALIDATION_FRACTION",
    "SELECTION_SEEDS",
    "FINAL_SEEDS",
    "DIVERGENCE_FRACTION",
    "SealedSplitError",
    "SealedSplit",
    "Splits",
    "three_splits",
    "divergence_threshold",
    "is_diverged",
    "diverged_runs",
    "RunOutcome",
    "check_seeds",
    "select",
    "inherit",
    "check_equal_budgets",
    "config_text",
    "selection_table",
    "run_record",
    "final_runs",
    "paired_deltas_pt",
    "t_interval",
    "ci_keys",
    "number",
    "delta_text",
    "put_delta",
    "StepBudget",
    "equal_time_budget",
    "half_budget",
    "fitted_schedule",
    "time_ratio",
    "time_ratio_with_compile",
    "plot_accuracy_time",
]

logger = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.15
SELECTION_SEEDS = (1000, 1001)  # two, disjoint from every final seed a benchmark uses
FINAL_SEEDS = tuple(range(10))
DIVERGENCE_FRACTION = 0.9
_TIE = 1e-12  # scores closer than this are a tie (two means of the same counts in float)

Run = dict[str, Any]

# ------------------------------------------------------------------------------------- splits


class SealedSplitError(RuntimeError):
    """Raised when the test split is read outside the final runs."""


class SealedSplit:
    """A test split whose examples can be read only inside :func:`final_runs`.

    ``len()`` works (the size is recorded with the results); ``x`` and ``y`` raise
    :class:`SealedSplitError` unless :func:`final_runs` has opened the split.

    Examples:
      >>> s = SealedSplit(Split(x=np.zeros((3, 2), np.float32), y=np.zeros(3, np.int32)))
      >>> len(s)
      3
      >>> s.x
      Traceback (most recent call last):
      ...
      benchmarks.protocol.SealedSplitError: the test split is sealed: only final_runs reads it
    """

    def __init__(self, split: Split):
        self._split = split
        self._open = 0

    def __len__(self) -> int:
        return len(self._split)

    def __repr__(self) -> str:
        return f"SealedSplit({len(self)} examples{', open' if self._open else ''})"

    def _read(self) -> Split:
        if not self._open:
            raise SealedSplitError("the test split is sealed: only final_runs reads it")
        return self._split

    @property
    def x(self) -> np.ndarray:
        return self._read().x

    @property
    def y(self) -> np.ndarray:
        return self._read().y

    @contextlib.contextmanager
    def _opened(self) -> Iterator[Split]:
        self._open += 1
        try:
            yield self._split
        finally:
            self._open -= 1


class Splits(NamedTuple):
    """Training less validation, validation, the sealed test split, and their record.

    ``record`` goes into the results' ``config``: ``validation_fraction``,
    ``validation_seed``, ``stratified``, the sizes (``train_examples``,
    ``validation_examples``, ``test_examples``) and the per-class counts
    (``train_class_counts``, ``validation_class_counts``, lists indexed by label).
    """

    train: Split
    validation: Split
    test: SealedSplit
    record: dict[str, Any]


def three_splits(dataset: Any, *, fraction: float = VALIDATION_FRACTION, seed: int = 0) -> Splits:
    """Carves a seeded, stratified validation split from the training data; seals the test.

    Args:
      dataset: an :class:`optax_multirate.data.Dataset` (``train``, ``test``,
        ``num_classes``); pass ``dataclasses.replace(data, train=...)`` for a subset.
      fraction: the share of the training data held out (15% by default).
      seed: seeds the choice of validation examples.

    Returns:
      :class:`Splits`; every class is on both sides of the validation split, in proportion.

    Raises:
      ValueError: as :func:`optax_multirate.data.validation_split` with ``stratify=True``.

    Examples:
      >>> from optax_multirate.data import Dataset
      >>> y = np.repeat(np.arange(3, dtype=np.int32), 20)
      >>> split = Split(x=np.zeros((60, 2), np.float32), y=y)
      >>> s = three_splits(Dataset("toy", split, split, 3, (2,)))
      >>> s.record["validation_class_counts"], s.record["train_examples"]
      ([3, 3, 3], 51)
    """
    train, val = validation_split(dataset.train, fraction, seed=seed, stratify=True)
    counts = lambda s: np.bincount(s.y, minlength=dataset.num_classes).tolist()
    record = {
        "validation_fraction": fraction,
        "validation_seed": seed,
        "stratified": True,
        "train_examples": len(train),
        "validation_examples": len(val),
        "test_examples": len(dataset.test),
        "train_class_counts": counts(train),
        "validation_class_counts": counts(val),
    }
    return Splits(train, val, SealedSplit(dataset.test), record)


# --------------------------------------------------------------------------------- divergence


def divergence_threshold(num_classes: int) -> float:
    """``0.9 * ln(num_classes)``: a final training loss at or above it means diverged.

    ``ln(num_classes)`` is the loss of a uniform guess; a run that ends near it learned
    nothing.

    Examples:
      >>> print(f"{divergence_threshold(10):.4f}")
      2.0723
    """
    _checks.check_int("num_classes", num_classes, low=2)
    return DIVERGENCE_FRACTION * math.log(num_classes)


def is_diverged(train_loss: float | Sequence[float], num_classes: int) -> bool:
    """Whether a run diverged: a non-finite loss, or a last epoch's loss >= the threshold.

    Args:
      train_loss: the per-epoch mean training losses (or the last one alone); an epoch with a
        non-finite step has a non-finite mean.
      num_classes: classes of the task (see :func:`divergence_threshold`).

    Raises:
      ValueError: for an empty sequence.

    Examples:
      >>> is_diverged([2.3, 0.4], 10), is_diverged([0.4, float("nan"), 0.3], 10)
      (False, True)
      >>> is_diverged([2.3, 2.1], 10)
      True
    """
    losses = [float(train_loss)] if np.ndim(train_loss) == 0 else [float(v) for v in train_loss]
    if not losses:
        raise ValueError("train_loss must hold at least one epoch's loss, got none")
    return not all(map(math.isfinite, losses)) or losses[-1] >= divergence_threshold(num_classes)


def diverged_runs(runs: Sequence[Mapping[str, Any]]) -> int:
    """How many runs are flagged ``diverged`` (every summary reports it).

    Raises:
      ValueError: if a run carries no ``diverged`` flag (it did not come from
        :func:`final_runs`).

    Examples:
      >>> diverged_runs([{"diverged": True}, {"diverged": False}])
      1
    """
    missing = [i for i, r in enumerate(runs) if "diverged" not in r]
    if missing:
        raise ValueError(f"runs {missing[:5]} carry no 'diverged' flag; use final_runs")
    return sum(bool(r["diverged"]) for r in runs)


# ---------------------------------------------------------------------------------- selection


class RunOutcome(NamedTuple):
    """What a selection run reports: final-epoch validation accuracy, per-epoch train loss."""

    val_accuracy: float
    train_loss: tuple[float, ...]


def _outcome(x: Any) -> RunOutcome:
    if isinstance(x, Mapping):
        x = RunOutcome(x["val_accuracy"], x["train_loss"])
    losses = np.atleast_1d(np.asarray(x.train_loss, np.float64))
    return RunOutcome(float(x.val_accuracy), tuple(losses.tolist()))


def _seeds(name: str, seeds: Sequence[int]) -> list[int]:
    out = [_checks.check_int(f"{name}[{i}]", s, low=0) for i, s in enumerate(seeds)]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct seeds, at least one, got {list(seeds)}")
    return out


def check_seeds(selection_seeds: Sequence[int], final_seeds: Sequence[int]) -> list[int]:
    """Checks two distinct selection seeds, disjoint from the final seeds; returns them.

    Raises:
      ValueError: for a number of selection seeds other than two, repeated seeds, or a
        seed in both lists.

    Examples:
      >>> check_seeds((1000, 1001), range(10))
      [1000, 1001]
      >>> check_seeds((0, 1001), range(10))
      Traceback (most recent call last):
      ...
      ValueError: selection seeds must be disjoint from the final seeds, both have [0]
    """
    sel, final = _seeds("selection seeds", selection_seeds), _seeds("final seeds", final_seeds)
    if len(sel) != 2:
        raise ValueError(f"selection takes exactly two seeds, got {sel}")
    both = sorted(set(sel) & set(final))
    if both:
        raise ValueError(f"selection seeds must be disjoint from the final seeds, both have {both}")
    return sel


def select(
    arm: str,
    grid: Sequence[Mapping[str, Any]],
    run: Callable[[dict[str, Any], int], RunOutcome | Mapping[str, Any]],
    *,
    final_seeds: Sequence[int],
    num_classes: int,
    seeds: Sequence[int] = SELECTION_SEEDS,
    budget: int | None = None,
) -> dict[str, Any]:
    """Chooses an arm's configuration on validation: the selection record of one arm.

    Every configuration is run on each selection seed and scored by its final-epoch
    validation accuracy averaged over the seeds. A configuration that diverged
    (:func:`is_diverged`) on any seed scores ``None`` and is never chosen; among the rest the
    highest score wins, a tie going to the earlier grid entry (order the grid from the most
    conservative). An arm whose every configuration diverged gets ``"chosen": None`` and
    ``"all_diverged": True``; :func:`final_runs` gives it no final runs.

    Args:
      arm: the arm's name (for the log).
      grid: the configurations, dicts of JSON values, most conservative first.
      run: ``run(config, seed)`` trains on the training split and returns a
        :class:`RunOutcome` or a mapping with ``val_accuracy`` and ``train_loss`` (per
        epoch), e.g. :meth:`BatchedResult.outcome`. It never sees the test split.
      final_seeds: the seeds of the final runs (the selection seeds must avoid them).
      num_classes: classes of the task, for the divergence rule.
      seeds: the two selection seeds.
      budget: the benchmark's declared number N of configurations per arm; checked against
        ``len(grid)`` when given.

    Returns:
      ``{"grid", "scores", "chosen", "configs_tried", "diverged": [{"config", "seed"}],
      "all_diverged", "seeds", "val_accuracy"}``; ``scores`` and ``val_accuracy``
      (per config, per seed) are aligned with ``grid``.

    Raises:
      ValueError: for an empty grid, a grid whose length is not ``budget``, or seeds refused
        by :func:`check_seeds`.

    Examples:
      >>> table = {0.1: (0.90, [0.5, 0.3]), 0.3: (0.92, [0.4, 0.2]), 1.0: (0.1, [9.0, 2.3])}
      >>> run = lambda c, seed: table[c["lr"]]
      >>> grid = [{"lr": 0.1}, {"lr": 0.3}, {"lr": 1.0}]
      >>> rec = select("sgd", grid, lambda c, s: dict(zip(("val_accuracy", "train_loss"),
      ...              run(c, s))), final_seeds=range(10), num_classes=10)
      >>> rec["chosen"], rec["scores"], rec["diverged"]
      ({'lr': 0.3}, [0.9, 0.92, None], [{'config': 2, 'seed': 1000}, {'config': 2, 'seed': 1001}])
    """
    seeds = check_seeds(seeds, final_seeds)
    grid = [dict(c) for c in grid]
    if not grid:
        raise ValueError(f"grid of arm {arm!r} must hold at least one configuration, got none")
    if budget is not None and len(grid) != _checks.check_int("budget", budget, low=1):
        raise ValueError(
            f"arm {arm!r}: budget is {budget} configurations, the grid has {len(grid)}"
        )
    scores, diverged, accs = [], [], []
    for i, config in enumerate(grid):
        outs = [_outcome(run(dict(config), s)) for s in seeds]
        bad = [s for s, o in zip(seeds, outs) if is_diverged(o.train_loss, num_classes)]
        diverged += [{"config": i, "seed": s} for s in bad]
        accs.append([o.val_accuracy for o in outs])
        scores.append(None if bad else statistics.fmean(accs[-1]))
        logger.info("select %s: config %d %s -> %s", arm, i, config, scores[-1])
    best = None
    for i, score in enumerate(scores):
        if score is not None and (best is None or score > scores[best] + _TIE):
            best = i
    if best is None:
        logger.warning("select %s: every configuration diverged; no final runs", arm)
    return {
        "grid": grid,
        "scores": scores,
        "chosen": None if best is None else dict(grid[best]),
        "configs_tried": len(grid),
        "diverged": diverged,
        "all_diverged": best is None,
        "seeds": seeds,
        "val_accuracy": accs,
    }


def inherit(selection: Mapping[str, Mapping[str, Any]], source: str) -> dict[str, Any]:
    """The record of an arm that takes ``source``'s choice (a control, a paper's protocol).

    Raises:
      ValueError: if ``source`` has no record or itself inherits.

    Examples:
      >>> sel = {"sgd": {"chosen": {"lr": 0.1}, "configs_tried": 3}}
      >>> inherit(sel, "sgd")
      {'grid': [], 'scores': [], 'chosen': {'lr': 0.1}, 'configs_tried': 0, 'inherits': 'sgd'}
    """
    if source not in selection:
        raise ValueError(f"source must be an arm with a selection record, got {source!r}")
    rec = selection[source]
    if "inherits" in rec:
        raise ValueError(f"source {source!r} inherits itself; inherit from {rec['inherits']!r}")
    chosen = None if rec["chosen"] is None else dict(rec["chosen"])
    return {"grid": [], "scores": [], "chosen": chosen, "configs_tried": 0, "inherits": source}


def check_equal_budgets(selection: Mapping[str, Mapping[str, Any]]) -> int:
    """Checks that every selected (non-inheriting) arm tried the same number N of configs.

    Returns:
      N.

    Raises:
      ValueError: if the selected arms differ in N, or no arm was selected.

    Examples:
      >>> check_equal_budgets({"a": {"configs_tried": 4}, "b": {"configs_tried": 4},
      ...                      "c": {"configs_tried": 0, "inherits": "a"}})
      4
    """
    tried = {arm: r["configs_tried"] for arm, r in selection.items() if "inherits" not in r}
    if not tried:
        raise ValueError("no arm was selected: every record inherits")
    if len(set(tried.values())) != 1:
        raise ValueError(f"selected arms must try the same number of configurations, got {tried}")
    return next(iter(tried.values()))


def config_text(config: Mapping[str, Any] | None, *, hide: Collection[str] = ()) -> str:
    """A configuration as ``key=value, ...`` for a results table, the keys of ``hide`` left out.

    Examples:
      >>> config_text({"learning_rate": 0.1, "schedule": "cosine"}, hide=("schedule",))
      'learning_rate=0.1'
      >>> config_text(None)
      '(every configuration diverged)'
    """
    if config is None:
        return "(every configuration diverged)"
    return ", ".join(f"{k}={v}" for k, v in config.items() if k not in hide)


def selection_table(
    selection: Mapping[str, Mapping[str, Any]],
    *,
    arms: Sequence[str] | None = None,
    hide: Collection[str] = (),
) -> str:
    """The Markdown table of the arms' selection records (:func:`select`, :func:`inherit`).

    One row per configuration of each arm's grid: the configuration (:func:`config_text`),
    its final-epoch validation accuracy on each selection seed and its score (their mean,
    ``diverged`` where a seed diverged); the chosen configuration and its score in bold. An
    arm that inherits gets one row naming its source and the configuration it takes.

    Args:
      selection: ``{arm: record}``.
      arms: the arms to show, in this order (default: every arm of ``selection``).
      hide: configuration keys left out of the table (e.g. one that every config shares).

    Returns:
      The table's lines joined by newlines (no newline at the end).

    Examples:
      >>> rec = {"grid": [{"lr": 0.1}, {"lr": 1.0}], "val_accuracy": [[0.9, 0.8], [0.1, 0.1]],
      ...        "scores": [0.85, None], "chosen": {"lr": 0.1}}
      >>> print(selection_table({"sgd": rec, "ctl": {"chosen": {"lr": 0.1}, "inherits": "sgd"}}))
      | arm | configuration | validation accuracy per seed | score |
      | --- | --- | --- | ---: |
      | sgd | **lr=0.1** | 0.9000 / 0.8000 | **0.8500** |
      | sgd | lr=1.0 | 0.1000 / 0.1000 | diverged |
      | ctl | inherits sgd: lr=0.1 | | |
    """
    lines = [
        "| arm | configuration | validation accuracy per seed | score |",
        "| --- | --- | --- | ---: |",
    ]
    for arm in selection if arms is None else arms:
        rec = selection[arm]
        if "inherits" in rec:
            chosen = config_text(rec["chosen"], hide=hide)
            lines.append(f"| {arm} | inherits {rec['inherits']}: {chosen} | | |")
            continue
        for config, accs, score in zip(rec["grid"], rec["val_accuracy"], rec["scores"]):
            mark = "**" if config == rec["chosen"] else ""
            per_seed = " / ".join(f"{a:.4f}" for a in accs)
            value = "diverged" if score is None else f"{score:.4f}"
            lines.append(
                f"| {arm} | {mark}{config_text(config, hide=hide)}{mark} | {per_seed} "
                f"| {mark}{value}{mark} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------- final runs


def _train_losses(run: Mapping[str, Any]) -> list[float]:
    if "train_loss" in run:
        return list(np.atleast_1d(np.asarray(run["train_loss"], np.float64)))
    if run.get("history"):
        return [float(h["train_loss"]) for h in run["history"]]
    raise ValueError(
        f"final run of arm {run['arm']!r}, seed {run['seed']} returned no training loss "
        "('train_loss' per epoch, or 'history' rows with 'train_loss')"
    )


def run_record(result: Any, *, step_times: str | None = "full") -> Run:
    """The figures of a run, from the :class:`~optax_multirate.train.FitResult` of its ``fit``.

    ``final_accuracy`` (the last ``test_accuracy``, nan without one), ``train_time_s``,
    ``compile_time_s``, ``steps`` and ``history``, with the step times asked for:

    * ``step_times="full"``: ``step_time_ms``, the median time of the full-gradient steps
      (nan where there are none);
    * ``"per_mask"``: ``step_time_ms`` ``{mask name: median}`` and ``steps_per_mask``
      ``{mask name: timed steps}`` (the steps that compiled are not timed);
    * ``None``: no step time (the benchmark records its own).

    A benchmark adds its own figures to the dict it returns; :func:`final_runs` adds ``arm``,
    ``seed``, ``config`` and ``diverged``.

    Raises:
      ValueError: for another ``step_times``.

    Examples:
      >>> from types import SimpleNamespace
      >>> res = SimpleNamespace(final_accuracy=0.9, train_time_s=1.5, compile_time_s=0.5,
      ...                       steps=4, history=[], step_times_ms={"full": [2.0, 4.0, 9.0]})
      >>> run_record(res)["step_time_ms"]
      4.0
      >>> run_record(res, step_times="per_mask")["steps_per_mask"]
      {'full': 3}
      >>> sorted(run_record(res, step_times=None))
      ['compile_time_s', 'final_accuracy', 'history', 'steps', 'train_time_s']
    """
    record: Run = {
        "final_accuracy": result.final_accuracy,
        "train_time_s": result.train_time_s,
        "compile_time_s": result.compile_time_s,
        "steps": result.steps,
    }
    times = result.step_times_ms
    if step_times == "full":
        record["step_time_ms"] = harness.median_ms(times.get("full", []))
    elif step_times == "per_mask":
        record["step_time_ms"] = {k: harness.median_ms(v) for k, v in times.items()}
        record["steps_per_mask"] = {k: len(v) for k, v in times.items()}
    elif step_times is not None:
        raise ValueError(f"step_times must be 'full', 'per_mask' or None, got {step_times!r}")
    record["history"] = result.history
    return record


def final_runs(
    arms: Mapping[str, Callable[[dict[str, Any], int, Split], Mapping[str, Any]]],
    selection: Mapping[str, Mapping[str, Any]],
    test: SealedSplit,
    *,
    num_classes: int,
    seeds: Sequence[int] = FINAL_SEEDS,
) -> list[Run]:
    """Runs every arm with its chosen configuration on the final seeds, seed-major.

    Seed 0 of every arm, then seed 1, ... (:func:`benchmarks.harness.interleave`), so a drift
    in the machine's speed hits every arm alike. The test split is opened for these runs only.
    An arm whose selection diverged everywhere gets no runs (its record says so).

    Args:
      arms: ``{arm: fn(config, seed, test) -> dict of figures}`` with ``final_accuracy``,
        ``train_time_s``, ``compile_time_s``, ``steps`` and the per-epoch training loss
        (``train_loss``, or ``history`` rows with ``train_loss``), e.g. :func:`run_record`
        of its ``fit``; ``test`` is a plain :class:`~optax_multirate.data.Split`.
      selection: the records of :func:`select` / :func:`inherit`, one per arm.
      test: the sealed test split of :func:`three_splits`.
      num_classes: classes of the task, for the divergence flag.
      seeds: the final seeds (ten by default).

    Returns:
      One dict per run: ``arm``, ``seed``, the run's figures, ``config`` (the chosen one) and
      ``diverged`` (:func:`is_diverged`).

    Raises:
      ValueError: for an arm without a record, a record whose selection seeds meet the final
        seeds, or a run without its training loss.
    """
    seeds = _seeds("final seeds", seeds)
    if not isinstance(test, SealedSplit):
        raise TypeError(f"test must be the SealedSplit of three_splits, got {type(test).__name__}")
    for arm in arms:
        if arm not in selection:
            raise ValueError(f"arm {arm!r} has no selection record")
        if "seeds" in selection[arm]:
            check_seeds(selection[arm]["seeds"], seeds)
    chosen = {arm: selection[arm]["chosen"] for arm in arms}
    for arm in (a for a, c in chosen.items() if c is None):
        logger.warning("final runs: arm %s diverged in selection; it gets no final runs", arm)
    with test._opened() as split:
        todo = {
            arm: (lambda seed, fn=fn, c=chosen[arm]: fn(dict(c), seed, split))
            for arm, fn in arms.items()
            if chosen[arm] is not None
        }
        runs = harness.interleave(todo, seeds)
    for r in runs:
        r["config"] = dict(chosen[r["arm"]])
        r["diverged"] = is_diverged(_train_losses(r), num_classes)
    return runs


# ---------------------------------------------------------------------- deltas and intervals


def paired_deltas_pt(
    runs: Sequence[Mapping[str, Any]], arm: str, baseline: str, *, key: str = "final_accuracy"
) -> list[float]:
    """Per-seed ``arm - baseline`` of ``key`` in percentage points, in seed order.

    Raises:
      ValueError: if the two arms do not have runs on the same seeds, once each.

    Examples:
      >>> runs = [{"arm": "b", "seed": 0, "final_accuracy": 0.90},
      ...         {"arm": "m", "seed": 0, "final_accuracy": 0.92}]
      >>> [round(d, 6) for d in paired_deltas_pt(runs, "m", "b")]
      [2.0]
    """
    by = {}
    for name in (arm, baseline):
        rows = [r for r in runs if r["arm"] == name]
        by[name] = {r["seed"]: float(r[key]) for r in rows}
        if not rows or len(by[name]) != len(rows):
            raise ValueError(f"arm {name!r} must have one run per seed, got {len(rows)} runs")
    if set(by[arm]) != set(by[baseline]):
        raise ValueError(
            f"{arm!r} and {baseline!r} must share seeds: {sorted(by[arm])} vs "
            f"{sorted(by[baseline])}"
        )
    return [100.0 * (by[arm][s] - by[baseline][s]) for s in sorted(by[arm])]


def t_interval(
    values: Sequence[float], *, confidence: float = 0.95
) -> tuple[float | None, float | None]:
    """The t confidence interval of the mean of ``values`` (``scipy.stats.t.interval``).

    Returns:
      ``(low, high)``, or ``(None, None)`` where it is undefined: fewer than two values, all
      values equal, or a non-finite value.

    Examples:
      >>> lo, hi = t_interval([1.0, 2.0, 4.0])
      >>> print(f"{lo:.3f} {hi:.3f}")
      -1.461 6.128
      >>> t_interval([1.0]), t_interval([2.0, 2.0])
      ((None, None), (None, None))
    """
    v = np.asarray(values, np.float64)
    if v.size < 2 or not np.all(np.isfinite(v)) or np.ptp(v) == 0.0:
        return None, None
    from scipy import stats

    lo, hi = stats.t.interval(confidence, v.size - 1, loc=v.mean(), scale=stats.sem(v))
    return float(lo), float(hi)


def put_delta(
    summary: dict[str, Any], key: str, deltas_pt: Sequence[float], *, confidence: float = 0.95
) -> None:
    """Writes the mean delta under ``key`` and its t-interval under :func:`ci_keys`.

    Examples:
      >>> s = {}
      >>> put_delta(s, "accuracy_delta_pt", [0.5])
      >>> s["accuracy_delta_pt"], s["accuracy_delta_ci_low_pt"], s["accuracy_delta_ci_high_pt"]
      (0.5, None, None)
    """
    low, high = ci_keys(key)
    if len(deltas_pt) == 0:
        raise ValueError(f"deltas_pt for {key!r} must hold at least one delta, got none")
    summary[key] = statistics.fmean(float(d) for d in deltas_pt)
    summary[low], summary[high] = t_interval(deltas_pt, confidence=confidence)


# ------------------------------------------------------------------------------ time controls


class StepBudget(NamedTuple):
    """A step budget matched to a time: ``steps`` of ``step_time_s`` fill ``seconds``."""

    steps: int
    seconds: float
    step_time_s: float


def _arm_mean(runs: Sequence[Mapping[str, Any]], arm: str, fn: Callable[[Mapping], float]):
    vals = [float(fn(r)) for r in runs if r["arm"] == arm]
    if not vals:
        raise ValueError(f"arm {arm!r} has no runs")
    return statistics.fmean(vals)


def equal_time_budget(runs: Sequence[Mapping[str, Any]], method: str, baseline: str) -> StepBudget:
    """The baseline steps that fit in the method's measured mean train time.

    The baseline's per-step time is its total train time over its total steps (compile
    excluded); the budget is ``floor(method's mean train_time_s / that)``, at least one.

    Examples:
      >>> runs = [{"arm": "m", "train_time_s": 3.0}, {"arm": "m", "train_time_s": 3.2},
      ...         {"arm": "b", "train_time_s": 2.0, "steps": 100},
      ...         {"arm": "b", "train_time_s": 2.0, "steps": 100}]
      >>> equal_time_budget(runs, "m", "b").steps
      155
    """
    seconds = _arm_mean(runs, method, lambda r: r["train_time_s"])
    step_s = _arm_mean(runs, baseline, lambda r: r["train_time_s"]) / _arm_mean(
        runs, baseline, lambda r: r["steps"]
    )
    return StepBudget(max(1, math.floor(seconds / step_s + 1e-9)), seconds, step_s)


def half_budget(baseline_steps: int) -> int:
    """Half the baseline's steps (at least one): the control that shows time matters.

    Examples:
      >>> half_budget(311)
      155
    """
    return max(1, _checks.check_int("baseline_steps", baseline_steps, low=1) // 2)


def fitted_schedule(config: Mapping[str, Any], steps: int) -> optax.Schedule:
    """The learning-rate schedule of ``config`` fitted to a budget of ``steps``.

    ``config["learning_rate"]`` is the peak; ``config.get("schedule", "cosine")`` is one of
    ``"cosine"`` (``optax.cosine_decay_schedule(lr, steps, alpha=final_fraction)``),
    ``"linear"`` (to ``lr * final_fraction`` at ``steps``), ``"warmup_cosine"`` (from 0 over
    ``warmup_fraction * steps``, then cosine to ``lr * final_fraction`` at ``steps``) or
    ``"constant"``; ``final_fraction`` defaults to 0, ``warmup_fraction`` to 0.05. The
    learning rate may be traced (:func:`run_batched`).

    Raises:
      ValueError: for an unknown schedule or ``steps < 1``.

    Examples:
      >>> sched = fitted_schedule({"learning_rate": 0.1}, half_budget(300))
      >>> print(f"{sched(0):.3f} {sched(75):.3f} {sched(150):.3f}")
      0.100 0.050 0.000
    """
    steps = _checks.check_int("steps", steps, low=1)
    kind = _checks.check_choice(
        "schedule",
        config.get("schedule", "cosine"),
        ("cosine", "linear", "warmup_cosine", "constant"),
    )
    lr, end = config["learning_rate"], config.get("final_fraction", 0.0)
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "linear":
        return optax.linear_schedule(lr, lr * end, steps)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, steps, alpha=end)
    warmup = max(1, round(config.get("warmup_fraction", 0.05) * steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * end)


def time_ratio(runs: Sequence[Mapping[str, Any]], arm: str, baseline: str) -> float:
    """Mean train time of ``arm`` over the baseline's (compile excluded), same runs."""
    t = lambda r: r["train_time_s"]
    return _arm_mean(runs, arm, t) / _arm_mean(runs, baseline, t)


def time_ratio_with_compile(runs: Sequence[Mapping[str, Any]], arm: str, baseline: str) -> float:
    """As :func:`time_ratio`, with each run's ``compile_time_s`` added to its train time.

    Examples:
      >>> runs = [{"arm": "m", "train_time_s": 1.0, "compile_time_s": 1.0},
      ...         {"arm": "b", "train_time_s": 2.0, "compile_time_s": 0.0}]
      >>> time_ratio(runs, "m", "b"), time_ratio_with_compile(runs, "m", "b")
      (0.5, 1.0)
    """
    t = lambda r: r["train_time_s"] + r["compile_time_s"]
    return _arm_mean(runs, arm, t) / _arm_mean(runs, baseline, t)


# ----------------------------------------------------------------------------------- the plot


def plot_accuracy_time(
    runs: Sequence[Mapping[str, Any]],
    *,
    equal_time_s: float | None = None,
    equal_time_arm: str | None = None,
    title: str | None = None,
) -> Callable[[Any], None]:
    """A plot for :func:`benchmarks.harness.write_results`: test accuracy against wall time.

    One line per arm, the mean over seeds of each epoch's ``(train_time_s, test_accuracy)``
    from the runs' ``history``, with a band from the lowest to the highest accuracy over the
    seeds. ``equal_time_s`` draws the method's measured time as a dashed vertical line, and
    ``equal_time_arm`` marks that arm's mean final point with a star.

    Returns:
      ``plot(fig) -> None`` drawing on a matplotlib figure (matplotlib is needed only to draw).
    """

    def plot(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for n, arm in enumerate(dict.fromkeys(r["arm"] for r in runs)):
            hists = [r["history"] for r in runs if r["arm"] == arm and r.get("history")]
            if not hists:
                continue
            m = min(map(len, hists))
            t = np.array([[h["train_time_s"] for h in hist[:m]] for hist in hists]).mean(0)
            a = np.array([[h["test_accuracy"] for h in hist[:m]] for hist in hists])
            ax.plot(t, a.mean(0), marker="o", ms=3, color=f"C{n}", label=arm)
            ax.fill_between(t, a.min(0), a.max(0), color=f"C{n}", alpha=0.2, lw=0)
            if arm == equal_time_arm:
                ax.plot(
                    t[-1],
                    a.mean(0)[-1],
                    "*",
                    ms=14,
                    color=f"C{n}",
                    mec="k",
                    label=f"{arm} (equal time)",
                )
        if equal_time_s is not None:
            ax.axvline(
                equal_time_s,
                color="k",
                ls="--",
                lw=1,
                label=f"method's time ({equal_time_s:.2f} s)",
            )
        ax.set_xlabel("train time (s, compile excluded)")
        ax.set_ylabel("test accuracy (mean; band: min-max over seeds)")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()

    return plot


def __getattr__(name: str) -> Any:
    """``run_batched`` and ``BatchedResult`` live in :mod:`benchmarks.batched`."""
    if name in ("run_batched", "BatchedResult"):
        from benchmarks import batched

        return getattr(batched, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
