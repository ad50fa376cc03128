"""Multirate fine-tuning of a pretrained backbone against training everything, under one protocol.

The regime of the multirate paper's transfer claim: a strong pretrained backbone and a small
target task. A 1D CNN (:class:`benchmarks.transfer_task.Conv1DNet`) is pretrained on the
digits 0-4 of a large MNIST-1D set generated offline (about 20,000 training signals), then
fine-tuned on the first 2,000 training signals of digits 5-9 with a fresh 5-way head
(:mod:`benchmarks.transfer_task`). Arms, all under :mod:`benchmarks.protocol`:

* ``train_all``: SGD with momentum on every param, cosine schedule fitted to the budget;
* ``head_only`` (control): the backbone frozen, never differentiated;
* ``k2``, ``k5``, ``k10``: ``multirate`` with linear drift, the head fast on every step, the
  backbone slow, updated from one gradient per cycle of ``k`` steps; the fast and the slow step
  sizes are selected together (a joint grid), not the slow one fixed at ``k`` times the fast;
* ``train_all_half_budget`` (control, inherits ``train_all``'s choice): half the steps, its
  schedule fitted to them;
* ``train_all_equal_time_k2`` / ``_k5`` / ``_k10``: train all for as many steps as fit in
  that multirate arm's measured mean train time, schedule fitted, step size selected.

Every selected arm tries the same number N of configurations on two selection seeds with the
vmapped runner (:func:`benchmarks.batched.run_batched`, full gradients: the same numbers as
the phased step); final runs go through :func:`optax_multirate.fit` one at a time on ten
paired seeds, the multirate and head-only arms with the phased step (host dispatch: a
fast-only step differentiates the head alone), train all with the plain full step. Before the
final runs the budget is checked on validation: half the budget must cost train all at least
1 point and head only must be at least 3 points below train all; if the first check fails the
budget is halved, if the second fails the target is time-reversed (a domain shift), and the
results list every attempt. ``best_arm``: among the multirate arms whose predicted time ratio
(``(1 + (k - 1) r) / k`` with the measured fast/full step-time ratio ``r``) is at most 0.5,
the one with the best validation accuracy (ties to the larger ``k``).

``--map`` runs the regime map instead: four pretraining strengths x k in {2, 5, 10}, each cell
that k's arm against train all (and against train all at equal time) over three seeds, with
selection shared within a strength; results go to ``multirate_transfer_map.*``.

Run: ``python -m benchmarks.multirate_transfer`` (full), ``--map``, or ``--quick``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import harness, protocol
from benchmarks import transfer_task as tt
from benchmarks.batched import run_batched
from optax_multirate.data import Split
from optax_multirate.train import Evaluate, fit, init_model, make_train_step, mask_name

logger = logging.getLogger(__name__)

NAME = "multirate_transfer"
MAP_NAME = "multirate_transfer_map"
KS = (2, 5, 10)
NUM_CLASSES = len(tt.TARGET_CLASSES)
MIN_HALF_BUDGET_COST_PT = 1.0
MIN_HEAD_ONLY_GAP_PT = 3.0
MAX_PREDICTED_TIME_RATIO = 0.5


@dataclasses.dataclass(frozen=True)
class Level:
    """A pretraining strength: ``epochs`` over the first ``examples`` source signals."""

    name: str
    epochs: int
    examples: int | None = None  # None: every source training signal


@dataclasses.dataclass(frozen=True)
class Setup:
    """The sizes of a run (full or quick)."""

    num_samples: int  # MNIST-1D signals generated (all ten digits)
    target_train: int  # target training signals kept (15% of them go to validation)
    features: tuple[int, ...]
    batch_size: int
    epochs: int  # fine-tuning budget before the checks
    pretrain: Level  # the headline backbone
    pretrain_lr: float
    pretrain_batch_size: int
    lr_grid: tuple[float, ...]  # train all, head only, equal time: N step sizes
    fast_grid: tuple[float, ...]  # multirate: fast x slow = N configurations
    slow_grid: tuple[float, ...]
    map_levels: tuple[Level, ...]
    map_seeds: int
    check_attempts: int  # budget/task attempts at most (the checks' retries + 1)


GENERATOR_SEED = 1
FULL_LR_GRID = (0.003, 0.005, 0.007, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.12,
                0.15, 0.2, 0.25, 0.3)  # fmt: skip
FULL = Setup(
    num_samples=50_000,
    target_train=2_000,
    features=(32, 64, 128),
    batch_size=64,
    epochs=4,
    pretrain=Level("strong", 12),
    pretrain_lr=0.05,
    pretrain_batch_size=128,
    lr_grid=FULL_LR_GRID,
    fast_grid=(0.01, 0.03, 0.1, 0.2),
    slow_grid=(0.05, 0.1, 0.2, 0.3),
    map_levels=(
        Level("none", 0),
        Level("weak", 1, 1_000),
        Level("medium", 1),
        Level("strong", 12),
    ),
    map_seeds=3,
    check_attempts=4,
)
QUICK = Setup(
    num_samples=2_000,
    target_train=256,
    features=(8,),
    batch_size=16,
    epochs=2,
    pretrain=Level("strong", 3),
    pretrain_lr=0.1,
    pretrain_batch_size=32,
    lr_grid=(0.1, 0.3),
    fast_grid=(0.1,),
    slow_grid=(0.1, 0.3),
    map_levels=(Level("none", 0), Level("weak", 1, 256), Level("strong", 3)),
    map_seeds=1,
    check_attempts=1,
)

CLAIM = (
    "Vlaar & Leimkuhler (ICML 2022), transfer learning with the final fully connected layer "
    "fast and the backbone slow, trained with different learning rates: ResNet-50 "
    "(ImageNet-pretrained) to CIFAR-100, multirate 83.4% in 4,953 s against train all 83.2% "
    "in 9,873 s (time ratio 0.50) and fc only 53.6%; DistilBERT to SST-2, 89.4% in 198 s "
    'against 89.7% in 380 s (0.52): "almost half the time" at equal accuracy. Our goal, on '
    "the headline task: time ratio <= 0.5 with accuracy delta >= -0.5 pt (95% interval low "
    ">= -1.0 pt) and a positive accuracy delta against train all given the same time."
)


def _multirate_grid(s: Setup, k: int) -> list[dict[str, Any]]:
    """The joint grid of one multirate arm, most conservative (smallest slow step) first."""
    return [
        {"k": k, "fast_learning_rate": f, "slow_learning_rate": sl}
        for sl in s.slow_grid
        for f in s.fast_grid
    ]


# ------------------------------------------------------------------------------ the machinery


@dataclasses.dataclass
class Bench:
    """What selection and final runs of one backbone share: model, splits, batch, seeds."""

    model: tt.Conv1DNet
    splits: protocol.Splits
    batch_size: int
    final_seeds: list[int]

    def select(self, arm: str, make_tx: Callable, grid: Sequence[dict], steps: int) -> dict:
        """The arm's selection record: every config on the two selection seeds (vmapped)."""
        res = run_batched(self.model, functools.partial(make_tx, steps=steps), grid,
                          protocol.SELECTION_SEEDS, self.splits.train, self.splits.validation,
                          batch_size=self.batch_size, steps=steps)  # fmt: skip
        rec = protocol.select(arm, grid, res.outcome, final_seeds=self.final_seeds,
                              num_classes=NUM_CLASSES, budget=len(grid))  # fmt: skip
        rec["steps"] = steps
        return rec

    def validate(self, make_tx: Callable, config: Mapping[str, Any], steps: int) -> float:
        """Mean final validation accuracy of one config on the selection seeds (a check)."""
        res = run_batched(self.model, functools.partial(make_tx, steps=steps), [dict(config)],
                          protocol.SELECTION_SEEDS, self.splits.train, self.splits.validation,
                          batch_size=self.batch_size, steps=steps)  # fmt: skip
        return float(res.val_accuracy.mean())

    def final(self, make_tx: Callable, steps: int, dispatch: str) -> Callable:
        """A final-run function for :func:`protocol.final_runs`: one ``fit``, its own compile."""

        def run(config: dict[str, Any], seed: int, test: Split) -> dict[str, Any]:
            tx = make_tx(**config, steps=steps)
            data, epochs = tt.budget_data(self.splits.train, self.batch_size, steps, seed)
            res = fit(self.model, tx, data, epochs=epochs, seed=seed,
                      step=make_train_step(self.model, tx, dispatch=dispatch),
                      callbacks=[Evaluate({"test": test})])  # fmt: skip
            return protocol.run_record(res, step_times="per_mask")

        return run


def _arms_of(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["arm"], []).append(r)
    return out


def _fast_mask_name(model: tt.Conv1DNet, x: np.ndarray) -> tuple[str, tuple[bool, ...]]:
    params, _ = init_model(model, jax.random.PRNGKey(0), x[:1])
    mask = tuple(lab == "fast" for lab in jax.tree.leaves(tt.fast_slow_labels(params)))
    return mask_name(mask), mask


def _step_ratio(runs: Sequence[Mapping[str, Any]], fast: str) -> float | None:
    """Median fast-only step time over median full step time, over an arm's runs."""
    f = [r["step_time_ms"][fast] for r in runs if fast in r["step_time_ms"]]
    g = [r["step_time_ms"]["full"] for r in runs if "full" in r["step_time_ms"]]
    f, g = [v for v in f if math.isfinite(v)], [v for v in g if math.isfinite(v)]
    return statistics.median(f) / statistics.median(g) if f and g else None


def _put(summary: dict[str, Any], key: str, runs: Sequence, arm: str, base: str) -> None:
    """Paired delta (pt) with its interval, or None keys where an arm has no runs."""
    by = _arms_of(runs)
    if arm in by and base in by:
        protocol.put_delta(summary, key, protocol.paired_deltas_pt(runs, arm, base))
    else:
        summary[key] = None
        summary.update(dict.fromkeys(protocol.ci_keys(key)))


def _equal_time(
    bench: Bench, s: Setup, runs: list[dict], selection: dict[str, dict], seeds: Sequence[int]
) -> list[dict]:
    """Selects and runs ``train_all_equal_time_k*`` for every multirate arm that has runs."""
    by = _arms_of(runs)
    arms = {}
    for k in KS:
        if f"k{k}" not in by or "train_all" not in by:
            continue
        budget = protocol.equal_time_budget(runs, f"k{k}", "train_all")
        arm = f"train_all_equal_time_k{k}"
        rec = bench.select(arm, tt.train_all_tx, [{"learning_rate": v} for v in s.lr_grid],
                           budget.steps)  # fmt: skip
        rec["budget_seconds"] = budget.seconds
        selection[arm] = rec
        arms[arm] = bench.final(tt.train_all_tx, budget.steps, "full")
    if not arms:
        return []
    return protocol.final_runs(arms, selection, bench.splits.test, num_classes=NUM_CLASSES,
                               seeds=seeds)  # fmt: skip


def _arm_figures(summary: dict[str, Any], runs: list[dict], k: int, ratio: float | None) -> None:
    """The ``k{k}_`` keys: time ratios, paired deltas, the cost model's prediction."""
    p, arm, by = f"k{k}_", f"k{k}", _arms_of(runs)
    have = arm in by and "train_all" in by
    summary[p + "accuracy"] = harness.mean_std([r["final_accuracy"] for r in by[arm]])[0] if (
        arm in by) else None  # fmt: skip
    summary[p + "time_ratio"] = protocol.time_ratio(runs, arm, "train_all") if have else None
    summary[p + "time_ratio_with_compile"] = (
        protocol.time_ratio_with_compile(runs, arm, "train_all") if have else None
    )
    _put(summary, p + "accuracy_delta_pt", runs, arm, "train_all")
    _put(summary, p + "equal_time_accuracy_delta_pt", runs, arm, f"train_all_equal_time_k{k}")
    summary[p + "fast_step_time_ratio"] = ratio
    summary[p + "predicted_time_ratio"] = None if ratio is None else (1 + (k - 1) * ratio) / k


def _best_score(rec: Mapping[str, Any]) -> float:
    """The chosen configuration's validation score (nan if every configuration diverged)."""
    return max((v for v in rec["scores"] if v is not None), default=math.nan)


def _best_arm(selection: Mapping[str, Mapping], summary: Mapping[str, Any]) -> tuple[int, bool]:
    """``(k, rule met)``: best validation score among k with predicted ratio <= 0.5."""
    scored = []
    for k in KS:
        rec, pred = selection[f"k{k}"], summary[f"k{k}_predicted_time_ratio"]
        if rec["chosen"] is not None and pred is not None:
            scored.append((pred <= MAX_PREDICTED_TIME_RATIO, _best_score(rec), k, pred))
    if not scored:
        return KS[-1], False
    eligible = [t for t in scored if t[0]]
    if eligible:  # best validation accuracy, ties to the larger k
        return max(eligible, key=lambda t: (t[1], t[2]))[2], True
    return min(scored, key=lambda t: (t[3], -t[2]))[2], False  # nothing eligible: the cheapest


def _add_top_level(paths: Mapping[str, Any], command: str | None = None, **keys: Any) -> None:
    """Adds top-level keys to the written JSON (and fixes the recorded command if given)."""
    path = paths["json"]
    record = json.loads(path.read_text())
    if command is not None:
        old = record["command"]
        record["command"] = command
        md = paths["md"].read_text().replace(old, command)
        tmp = paths["md"].with_name(f".{paths['md'].name}.tmp")
        tmp.write_text(md)
        os.replace(tmp, paths["md"])
    record.update(harness._clean(keys))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=harness._json_default) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the headline


def _check_budget(
    task: tt.TransferTask, model: tt.Conv1DNet, s: Setup, epochs: int, seeds: list[int]
) -> tuple[Bench, dict[str, dict], int, list[dict]]:
    """Selects train all and head only, then checks the budget and the task on validation.

    Half the budget must cost train all >= 1 pt, head only must be >= 3 pt below train all
    (validation, selection seeds). Otherwise the budget is halved (first check) or the target
    time-reversed (second), and the checks rerun; every attempt is recorded.
    """
    attempts: list[dict] = []
    reverse = False
    while True:
        target = tt.reverse_time(task.target) if reverse else task.target
        bench = Bench(model, protocol.three_splits(target), s.batch_size, seeds)
        steps = epochs * (len(bench.splits.train) // s.batch_size)
        grid = [{"learning_rate": v} for v in s.lr_grid]
        selection = {
            "train_all": bench.select("train_all", tt.train_all_tx, grid, steps),
            "head_only": bench.select("head_only", tt.head_only_tx, grid, steps),
        }
        chosen = selection["train_all"]["chosen"]
        full, head = _best_score(selection["train_all"]), _best_score(selection["head_only"])
        half = (bench.validate(tt.train_all_tx, chosen, protocol.half_budget(steps))
                if chosen is not None else math.nan)  # fmt: skip
        cost, gap = 100 * (full - half), 100 * (full - head)
        ok_half, ok_head = cost >= MIN_HALF_BUDGET_COST_PT, gap >= MIN_HEAD_ONLY_GAP_PT
        attempts.append({"epochs": epochs, "steps": steps, "reverse_target": reverse,
                         "train_all_val_accuracy": full, "half_budget_val_accuracy": half,
                         "head_only_val_accuracy": head, "half_budget_val_cost_pt": cost,
                         "head_only_val_gap_pt": gap, "passed": ok_half and ok_head})  # fmt: skip
        logger.info("budget check: %s", attempts[-1])
        if (ok_half and ok_head) or chosen is None:
            break
        change = next_attempt(ok_half, ok_head, reverse=reverse, epochs=epochs)
        if change is None or len(attempts) >= s.check_attempts:
            attempts[-1]["next"] = "none left: the final runs use this budget and task, and the "
            attempts[-1]["next"] += "results say the checks failed"
            break
        reverse, epochs, attempts[-1]["next"] = change
    return bench, selection, steps, attempts


def next_attempt(
    ok_half: bool, ok_head: bool, *, reverse: bool, epochs: int
) -> tuple[bool, int, str] | None:
    """The change after a failed check: ``(reverse, epochs, what)``, or None if none is left.

    Head only not far enough below train all: the backbone need not move, so the task is
    hardened (the target time-reversed), once. Half the budget costing too little: time does
    not matter yet, so the budget is halved (down to one epoch).

    Examples:
      >>> next_attempt(False, True, reverse=False, epochs=4)
      (False, 2, 'shorten the budget: half the epochs')
      >>> next_attempt(True, False, reverse=False, epochs=4)
      (True, 4, 'harden the task: time-reverse the target')
      >>> next_attempt(False, False, reverse=True, epochs=1) is None
      True
    """
    if not ok_head and not reverse:
        return True, epochs, "harden the task: time-reverse the target"
    if not ok_half and epochs > 1:
        return reverse, epochs // 2, "shorten the budget: half the epochs"
    return None


def _headline(args: Any, argv: Sequence[str] | None, s: Setup, seeds: list[int]) -> dict:
    epochs = harness.epochs_from_args(args, full=s.epochs, quick=s.epochs)
    task = tt.make_task(num_samples=s.num_samples, seed=GENERATOR_SEED,
                        target_train=s.target_train)  # fmt: skip
    source_model = tt.Conv1DNet(s.features, num_classes=len(tt.SOURCE_CLASSES))
    pre = tt.pretrain(source_model, task.source, epochs=s.pretrain.epochs,
                      examples=s.pretrain.examples, learning_rate=s.pretrain_lr,
                      batch_size=s.pretrain_batch_size)  # fmt: skip
    logger.info("pretrained: source test accuracy %.4f", pre.accuracy)
    model = tt.Conv1DNet(s.features, num_classes=NUM_CLASSES, backbone=tt.Backbone(pre.params))

    # -- the checks on validation, then the multirate arms' selection ----------------------
    bench, selection, steps, attempts = _check_budget(task, model, s, epochs, seeds)
    for k in KS:
        selection[f"k{k}"] = bench.select(f"k{k}", tt.multirate_tx, _multirate_grid(s, k), steps)
    selection["train_all_half_budget"] = protocol.inherit(selection, "train_all")
    half = protocol.half_budget(steps)

    # -- final runs, then the equal-time baselines of each multirate arm --------------------
    arms = {"train_all": bench.final(tt.train_all_tx, steps, "full"),
            "head_only": bench.final(tt.head_only_tx, steps, "host"),
            **{f"k{k}": bench.final(tt.multirate_tx, steps, "host") for k in KS},
            "train_all_half_budget": bench.final(tt.train_all_tx, half, "full")}  # fmt: skip
    runs = protocol.final_runs(arms, selection, bench.splits.test, num_classes=NUM_CLASSES,
                               seeds=seeds)  # fmt: skip
    runs += _equal_time(bench, s, runs, selection, seeds)
    n = protocol.check_equal_budgets(selection)

    # -- figures -----------------------------------------------------------------------------
    fast, fast_mask = _fast_mask_name(model, bench.splits.train.x)
    by = _arms_of(runs)
    summary: dict[str, Any] = {}
    for k in KS:
        _arm_figures(summary, runs, k, _step_ratio(by.get(f"k{k}", []), fast))
    best, rule_met = _best_arm(selection, summary)
    for key in ("time_ratio", "time_ratio_with_compile", "predicted_time_ratio",
                "accuracy_delta_pt", "equal_time_accuracy_delta_pt"):  # fmt: skip
        summary[key] = summary[f"k{best}_{key}"]
        if key.endswith("_pt"):
            for ci in protocol.ci_keys(key):
                summary[ci] = summary[f"k{best}_{ci}"]
    _put(summary, "head_only_accuracy_delta_pt", runs, "head_only", "train_all")
    _put(summary, "baseline_half_budget_delta_pt", runs, "train_all_half_budget", "train_all")
    summary["diverged_runs"] = protocol.diverged_runs(runs)
    acc = harness.mean_std([r["final_accuracy"] for r in by.get("train_all", [])] or [math.nan])
    flops = _flops(model, bench, steps, fast_mask)
    summary.update(
        best_arm_k=best,
        best_arm_time_rule_met=rule_met,
        train_all_accuracy=acc[0],
        train_all_accuracy_std=acc[1],
        pretrained_accuracy=pre.accuracy,
        half_budget_val_cost_pt=attempts[-1]["half_budget_val_cost_pt"],
        head_only_val_gap_pt=attempts[-1]["head_only_val_gap_pt"],
        budget_checks_passed=attempts[-1]["passed"],
        fast_step_flop_ratio=flops[1] / flops[0],
        full_step_mflops=flops[0] / 1e6,
        configs_per_arm=n,
    )
    low = summary["accuracy_delta_ci_low_pt"]
    summary["goal_met"] = bool(
        summary["time_ratio"] is not None and summary["time_ratio"] <= 0.5
        and summary["accuracy_delta_pt"] >= -0.5 and low is not None and low >= -1.0
        and summary["equal_time_accuracy_delta_pt"] is not None
        and summary["equal_time_accuracy_delta_pt"] > 0
    )  # fmt: skip

    target = attempts[-1]["reverse_target"]
    config = {
        "model": f"Conv1DNet(features={s.features}, kernel_size=5): each conv + relu + max-pool "
        "2, flattened into a linear head; fast = head, slow = every conv",
        "dataset": task.record | {"reverse_target": target},
        "pretrain": {
            "level": s.pretrain.name,
            **pre.record,
            "source_test_accuracy": pre.accuracy,
        },  # fmt: skip
        "splits": bench.splits.record,
        "batch_size": s.batch_size,
        "epochs": attempts[-1]["epochs"],
        "steps": steps,
        "half_budget_steps": half,
        "budget_checks": attempts,
        "configs_per_arm": n,
        "optimizers": "SGD with momentum 0.9, cosine decay to 0 fitted to each run's budget; "
        "multirate: head at fast_learning_rate every step, backbone one update of "
        "slow_learning_rate per k-step cycle spread over the cycle (linear drift), its cosine "
        "over the cycles",
        "dispatch": {"train_all*": "full (plain step)", "head_only, k*": "host (phased step)"},
        "fast_mask": fast,
        "seeds": seeds,
        "selection_seeds": list(protocol.SELECTION_SEEDS),
        "best_arm_rule": "among k2/k5/k10 with predicted time ratio <= 0.5, the best "
        "validation accuracy (ties to the larger k)",
    }
    eq = by.get(f"train_all_equal_time_k{best}", [])
    paths = harness.write_results(
        NAME, args=args, config=config, runs=runs, summary=summary, claim_md=CLAIM,
        table_md=_table(summary, selection, runs, best, rule_met, attempts, fast, task, pre, s),
        plot=protocol.plot_accuracy_time(
            runs, equal_time_s=(statistics.fmean(r["train_time_s"] for r in by[f"k{best}"])
                                if f"k{best}" in by else None),
            equal_time_arm=f"train_all_equal_time_k{best}" if eq else None,
            title=f"Fine-tuning on MNIST-1D digits 5-9 (best arm k{best})"),
        argv=argv, selection=selection,
    )  # fmt: skip
    _add_top_level(paths, best_arm=f"k{best}")
    logger.info("summary: %s", summary)
    return summary


def _flops(model: tt.Conv1DNet, bench: Bench, steps: int, fast_mask: tuple[bool, ...]):
    """Compiled FLOPs of the full and the fast-only program of a multirate step."""
    tx = tt.multirate_tx(fast_learning_rate=0.01, slow_learning_rate=0.01, k=5, steps=steps)
    step = make_train_step(model, tx)
    params, state = init_model(model, jax.random.PRNGKey(0), bench.splits.train.x[:1])
    batch = {"x": bench.splits.train.x[: bench.batch_size],
             "y": bench.splits.train.y[: bench.batch_size]}  # fmt: skip
    args = (params, tx.init(params), state, batch, jax.random.PRNGKey(0))
    full = (True,) * len(fast_mask)
    return step.phased.flops(full, *args), step.phased.flops(fast_mask, *args)


# -------------------------------------------------------------------------------- the table


def _fmt(x: Any, spec: str = ".2f") -> str:
    return protocol.number(x, spec)


_delta = protocol.delta_text  # mean [low, high]


def _chosen(rec: Mapping[str, Any]) -> str:
    if rec["chosen"] is None:
        return "every config diverged"
    c = ", ".join(f"{k}={v}" for k, v in rec["chosen"].items() if k != "k")
    return c + (f" (inherits {rec['inherits']})" if "inherits" in rec else "")


def _table(s, selection, runs, best, rule_met, attempts, fast, task, pre, setup) -> str:
    by = _arms_of(runs)
    rows = [
        "| arm | chosen on validation | val. acc. | test acc. (mean ± std) | Δ vs train all, pt "
        "[95% CI] | train s | time ratio (with compile) | predicted | Δ vs train all at equal "
        "time, pt [95% CI] | diverged runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ta = by.get("train_all", [])
    for arm, rec in selection.items():
        rs = by.get(arm, [])
        scores = [v for v in rec["scores"] if v is not None]
        val = _fmt(max(scores), ".4f") if scores else "—"
        acc = harness.mean_std([r["final_accuracy"] for r in rs]) if rs else None
        acc_s = f"{acc[0]:.4f} ± {acc[1]:.4f}" if acc else "no runs"
        t = statistics.fmean(r["train_time_s"] for r in rs) if rs else None
        ratio = pred = eq = delta = "—"
        if arm.startswith("k") and arm[1:].isdigit():
            p = f"{arm}_"
            ratio = (f"{_fmt(s[p + 'time_ratio'], '.3f')} "
                     f"({_fmt(s[p + 'time_ratio_with_compile'], '.3f')})")  # fmt: skip
            pred = _fmt(s[p + "predicted_time_ratio"], ".3f")
            eq = _delta(s, p + "equal_time_accuracy_delta_pt")
            delta = _delta(s, p + "accuracy_delta_pt")
        elif rs and ta and arm != "train_all":
            ratio = f"{protocol.time_ratio(runs, arm, 'train_all'):.3f}"
            delta = _delta(_delta_keys(runs, arm), "d_pt")
        rows.append(f"| {arm} | {_chosen(rec)} | {val} | {acc_s} | {delta} | {_fmt(t)} | {ratio} "
                    f"| {pred} | {eq} | {sum(r['diverged'] for r in rs)}/{len(rs)} |")  # fmt: skip
    goal = "met" if s["goal_met"] else "NOT met"
    last = attempts[-1]
    why = ("predicted time ratio <= 0.5, best validation accuracy" if rule_met else
           "no multirate arm has a predicted time ratio <= 0.5: the cheapest one")  # fmt: skip
    rows += [
        "",
        f"**Best arm: k{best}** ({why}). Time ratio **{_fmt(s['time_ratio'], '.3f')}** (with "
        f"compile {_fmt(s['time_ratio_with_compile'], '.3f')}; cost model "
        f"{_fmt(s['predicted_time_ratio'], '.3f')}), "
        f"accuracy Δ **{_delta(s, 'accuracy_delta_pt')}** pt against train all, "
        f"**{_delta(s, 'equal_time_accuracy_delta_pt')}** pt against train all given the same "
        f"time; head only {_delta(s, 'head_only_accuracy_delta_pt')} pt; train all at half its "
        f"budget {_delta(s, 'baseline_half_budget_delta_pt')} pt. Paper: time ratio 0.50 at "
        f"+0.2 pt. Goal (time ratio <= 0.5, Δ >= -0.5 pt with CI low >= -1.0, equal-time Δ > "
        f"0): **{goal}**. Diverged final runs: {s['diverged_runs']}.",
        "",
        f"Task: {task.record['generator']}; source {task.record['source']}; target "
        f"{task.record['target']}{', time-reversed' if last['reverse_target'] else ''}. "
        f"Backbone: {pre.record['epochs']} epochs on {pre.record['source_examples']} source "
        f"signals, source test accuracy {pre.accuracy:.4f}. Fine-tuning budget: "
        f"{last['epochs']} epochs = {last['steps']} steps of batch {setup.batch_size}; "
        f"N = {s['configs_per_arm']} configurations per selected arm; fast-only program "
        f"`{fast}` (the head's kernel and bias), FLOP ratio to the full step "
        f"{s['fast_step_flop_ratio']:.3f}.",
        "",
        "Budget and task, checked on validation (selection seeds) before the final runs:",
        "",
    ]
    for a in attempts:
        rows.append(
            f"- {a['epochs']} epochs ({a['steps']} steps), target "
            f"{'time-reversed' if a['reverse_target'] else 'as generated'}: half the budget "
            f"costs train all {_fmt(a['half_budget_val_cost_pt'], '+.2f')} pt (needs >= "
            f"{MIN_HALF_BUDGET_COST_PT:g}), head only is "
            f"{_fmt(a['head_only_val_gap_pt'], '.2f')} pt below (needs >= "
            f"{MIN_HEAD_ONLY_GAP_PT:g}): {'passed' if a['passed'] else 'failed'}"
            + (f"; next: {a['next']}" if "next" in a else "")
        )  # fmt: skip
    budgets = ", ".join(f"{arm} {rec['steps']}" for arm, rec in selection.items() if "steps" in rec)
    rows += [
        "",
        "Selection (final-epoch validation accuracy on the two selection seeds, the score their "
        "mean, `diverged` where a seed diverged; the chosen configuration in bold; a multirate "
        f"arm's k is in its name). Steps of each selection run: {budgets}.",
        "",
        protocol.selection_table(selection, hide=("k",)),
        "",
        "Train time excludes compilation and evaluation; `time ratio (with compile)` adds each "
        "run's own compile time. Predicted: (1 + (k - 1) r) / k with r the measured median "
        "fast-only step time over the median full step time of that arm's runs. Equal time: "
        "train all for as many steps as fit in the arm's mean train time, its schedule fitted "
        "and its step size selected on validation; these arms run after the others (their "
        "budgets come from the others' measured times), interleaved by seed among themselves.",
    ]
    return "\n".join(rows)


def _delta_keys(runs: Sequence[Mapping[str, Any]], arm: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "d_pt", runs, arm, "train_all")
    return out


# ------------------------------------------------------------------------------ the regime map


def _regime_map(args: Any, argv: Sequence[str] | None, s: Setup, seeds: list[int]) -> dict:
    """Pretraining strength x k: each cell that k's arm against train all, three seeds.

    Every strength pretrains once (through ``fit``) and shares one selection of train all and
    k2/k5/k10 (N configurations each on the selection seeds), then the final runs, then the
    equal-time baselines, selected and run like the headline's. Same target and budget as
    the headline before its checks.
    """
    epochs = harness.epochs_from_args(args, full=s.epochs, quick=s.epochs)
    task = tt.make_task(num_samples=s.num_samples, seed=GENERATOR_SEED,
                        target_train=s.target_train)  # fmt: skip
    splits = protocol.three_splits(task.target)
    steps = epochs * (len(splits.train) // s.batch_size)
    source_model = tt.Conv1DNet(s.features, num_classes=len(tt.SOURCE_CLASSES))
    cache: dict[tuple[int, int | None], tt.Pretrained] = {}
    cells: list[dict[str, Any]] = []
    all_runs: list[dict] = []
    selection: dict[str, dict] = {}
    summary: dict[str, Any] = {}
    fast = None
    for level in s.map_levels:
        key = (level.epochs, level.examples)
        if key not in cache:
            cache[key] = tt.pretrain(source_model, task.source, epochs=level.epochs,
                                     examples=level.examples, learning_rate=s.pretrain_lr,
                                     batch_size=s.pretrain_batch_size)  # fmt: skip
        pre = cache[key]
        logger.info("map: pretraining %s, source test accuracy %.4f", level.name, pre.accuracy)
        model = tt.Conv1DNet(s.features, num_classes=NUM_CLASSES, backbone=tt.Backbone(pre.params))
        bench = Bench(model, splits, s.batch_size, seeds)
        fast = fast or _fast_mask_name(model, splits.train.x)[0]
        sel = {
            "train_all": bench.select(
                "train_all", tt.train_all_tx, [{"learning_rate": v} for v in s.lr_grid], steps
            )
        }
        for k in KS:
            sel[f"k{k}"] = bench.select(f"k{k}", tt.multirate_tx, _multirate_grid(s, k), steps)
        arms = {"train_all": bench.final(tt.train_all_tx, steps, "full"),
                **{f"k{k}": bench.final(tt.multirate_tx, steps, "host") for k in KS}}  # fmt: skip
        runs = protocol.final_runs(arms, sel, splits.test, num_classes=NUM_CLASSES, seeds=seeds)
        runs += _equal_time(bench, s, runs, sel, seeds)
        protocol.check_equal_budgets(sel)
        by = _arms_of(runs)
        figs: dict[str, Any] = {}
        for k in KS:
            _arm_figures(figs, runs, k, _step_ratio(by.get(f"k{k}", []), fast))
            cell = {"pretrain": level.name, "pretrain_epochs": level.epochs,
                    "pretrain_source_examples": pre.record["source_examples"],
                    "pretrained_accuracy": pre.accuracy, "k": k}  # fmt: skip
            for name in ("time_ratio", "time_ratio_with_compile", "predicted_time_ratio",
                         "accuracy_delta_pt", "equal_time_accuracy_delta_pt"):  # fmt: skip
                cell[name] = figs[f"k{k}_{name}"]
                if name.endswith("_pt"):
                    cell.update({c: figs[f"k{k}_{c}"] for c in protocol.ci_keys(name)})
            cell["diverged_runs"] = sum(r["diverged"] for r in by.get(f"k{k}", []))
            cells.append(cell)
            for name, v in cell.items():
                if name not in ("pretrain", "pretrain_epochs", "pretrain_source_examples", "k"):
                    summary[f"{level.name}_k{k}_{name}"] = v
        summary[f"{level.name}_train_all_accuracy"] = harness.mean_std(
            [r["final_accuracy"] for r in by.get("train_all", [])] or [math.nan])[0]  # fmt: skip
        selection.update({f"{level.name}_{arm}": rec for arm, rec in sel.items()})
        all_runs += [{"level": level.name, **r} for r in runs]
    eq = [c["equal_time_accuracy_delta_pt"] for c in cells if c["equal_time_accuracy_delta_pt"]
          is not None]  # fmt: skip
    summary.update(
        cells=len(cells),
        cells_equal_time_positive=sum(v > 0 for v in eq),
        cells_goal_met=sum(_cell_goal(c) for c in cells),
        best_equal_time_accuracy_delta_pt=max(eq) if eq else None,
        diverged_runs=protocol.diverged_runs(all_runs),
    )
    config = {
        "model": f"Conv1DNet(features={s.features}, kernel_size=5); fast = head, slow = convs",
        "dataset": task.record,
        "pretrain_levels": [
            dataclasses.asdict(lv)
            | {"source_test_accuracy": cache[(lv.epochs, lv.examples)].accuracy}
            for lv in s.map_levels
        ],  # fmt: skip
        "splits": splits.record,
        "batch_size": s.batch_size,
        "epochs": epochs,
        "steps": steps,
        "seeds": seeds,
        "selection_seeds": list(protocol.SELECTION_SEEDS),
        "configs_per_arm": len(s.lr_grid),
    }
    paths = harness.write_results(
        MAP_NAME, args=args, config=config, runs=all_runs, summary=summary, claim_md=CLAIM,
        table_md=_map_table(cells, s, steps, len(seeds)), plot=_map_plot(cells), argv=argv,
        selection=selection,
    )  # fmt: skip
    _add_top_level(paths, command=harness.command_line(argv, NAME), regime_map=cells)
    logger.info("regime map: %s", cells)
    return summary


def _cell_goal(c: Mapping[str, Any]) -> bool:
    low = c["accuracy_delta_ci_low_pt"]
    return bool(
        c["time_ratio"] is not None and c["time_ratio"] <= 0.5
        and c["accuracy_delta_pt"] is not None and c["accuracy_delta_pt"] >= -0.5
        and low is not None and low >= -1.0
        and c["equal_time_accuracy_delta_pt"] is not None and c["equal_time_accuracy_delta_pt"] > 0
    )  # fmt: skip


def _map_table(cells: Sequence[Mapping[str, Any]], s: Setup, steps: int, seeds: int) -> str:
    rows = [
        "| pretraining | pretrained acc. (source test) | k | time ratio (with compile) | "
        "predicted | Δ vs train all, pt [95% CI] | Δ vs train all at equal time, pt [95% CI] | "
        "goal | diverged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for c in cells:
        what = (
            "none (random backbone)"
            if not c["pretrain_epochs"]
            else f"{c['pretrain']}: {c['pretrain_epochs']} ep. x {c['pretrain_source_examples']}"
        )
        rows.append(
            f"| {what} | {c['pretrained_accuracy']:.4f} | {c['k']} | "
            f"{_fmt(c['time_ratio'], '.3f')} ({_fmt(c['time_ratio_with_compile'], '.3f')}) | "
            f"{_fmt(c['predicted_time_ratio'], '.3f')} | {_delta(c, 'accuracy_delta_pt')} | "
            f"{_delta(c, 'equal_time_accuracy_delta_pt')} | {'met' if _cell_goal(c) else '—'} | "
            f"{c['diverged_runs']}/{seeds} |"
        )  # fmt: skip
    rows += [
        "",
        f"Each cell: {seeds} paired seeds of that k's arm and of train all (and of train all "
        f"for the arm's measured time), {steps} fine-tuning steps of batch {s.batch_size}; "
        "step sizes selected on validation within each pretraining strength. Goal per cell: "
        "time ratio <= 0.5, Δ >= -0.5 pt with CI low >= -1.0, equal-time Δ > 0.",
    ]
    return "\n".join(rows)


def _map_plot(cells: Sequence[Mapping[str, Any]]) -> Callable[[Any], None]:
    """Three panels against pretraining strength: time ratio, Δ, Δ at equal time; one line per k."""

    def plot(fig: Any) -> None:
        levels = list(dict.fromkeys(c["pretrain"] for c in cells))
        acc = {c["pretrain"]: c["pretrained_accuracy"] for c in cells}
        xs = np.arange(len(levels))
        panels = (
            ("time_ratio", "time ratio (train time / train all)"),
            ("accuracy_delta_pt", "Δ accuracy vs train all (pt)"),
            ("equal_time_accuracy_delta_pt", "Δ vs train all at equal time (pt)"),
        )
        for i, (key, label) in enumerate(panels):
            ax = fig.add_subplot(1, 3, i + 1)
            for n, k in enumerate(KS):
                got = {c["pretrain"]: c for c in cells if c["k"] == k}
                ys = [got[lv][key] if got[lv][key] is not None else math.nan for lv in levels]
                err = None
                if key.endswith("_pt"):
                    lo, hi = protocol.ci_keys(key)
                    err = np.array([[y - (got[lv][lo] if got[lv][lo] is not None else y),
                                     (got[lv][hi] if got[lv][hi] is not None else y) - y]
                                    for lv, y in zip(levels, ys)]).T  # fmt: skip
                ax.errorbar(xs + 0.08 * (n - 1), ys, yerr=err, marker="o", ms=4, capsize=2,
                            color=f"C{n}", label=f"k={k}")  # fmt: skip
            ax.axhline(0.5 if key == "time_ratio" else 0.0, color="k", lw=0.8, ls="--")
            ax.set_xticks(xs, [f"{lv}\n{acc[lv]:.3f}" for lv in levels], fontsize=7)
            ax.set_xlabel("pretraining (source test acc.)", fontsize=8)
            ax.set_title(label, fontsize=8)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize=7)

    return plot


# ---------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark (or ``--map``) and writes its results; returns the summary.

    ``argv``: the command line (None: ``sys.argv[1:]``).
    """

    def flags(p: Any) -> None:
        p.add_argument("--map", action="store_true",
                       help="the regime map (pretraining strength x k); writes "
                       f"{MAP_NAME}.*")  # fmt: skip

    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=len(protocol.FINAL_SEEDS),
                                add_flags=flags)  # fmt: skip
    s = QUICK if args.quick else FULL
    if args.map:
        seeds = harness.seeds_from_args(args, full=s.map_seeds)
        return _regime_map(args, argv, s, seeds)
    return _headline(args, argv, s, seeds)


if __name__ == "__main__":
    main()
