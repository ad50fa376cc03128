"""Two regimes against the schedules a user would tune, and against schedule-free SGD.

On mnist1d, the MNIST subset and scikit-learn digits, with the MLP (2x256 ReLU, batch 64,
coupled L2 5e-4 in every arm), through the comparison protocol (:mod:`benchmarks.protocol`):
a stratified 15% of the training data is held out for validation, every selected arm picks
its configuration from its own grid of the same N configurations by final-epoch validation
accuracy over two selection seeds, and the chosen configurations train on 10 paired seeds
through ``fit``; the test split is read there only. Arms, per set:

* ``two_regimes``: constant-rate SGD, then a small-step optimizer
  (:func:`optax_multirate.two_regimes.two_regimes`, the body of ``two_regimes_sgd``); its
  large rate, switch point (a fraction of the budget) and small-step optimizer (``adam(1e-3)``
  or ``sgd(rate / 10)``) selected jointly;
* ``best_schedule``: SGD with momentum 0.9 under one of the schedules a user would tune (step
  decay x0.1 at 50% and 75%, cosine decay, linear decay, each to its peak rate), the family
  and the peak rate selected together: one arm;
* ``schedule_free``: ``optax.contrib.schedule_free_sgd`` (its rate and warmup selected),
  trained at its ``y`` sequence and evaluated at ``optax.contrib.schedule_free_eval_params``;
* controls inheriting ``two_regimes``' choice: ``small_only`` (its small-step optimizer for
  the whole budget) and ``large_only`` (its large step for the whole budget).

Selection of ``two_regimes`` and ``best_schedule`` goes through the batched runner; that of
``schedule_free`` one run at a time through ``fit``, which evaluates at the averaged point.

Run: ``python -m benchmarks.two_regimes`` (full) or ``--quick`` (seconds: the code path only).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from benchmarks import _sets, harness, protocol
from optax_multirate import _checks
from optax_multirate.data import num_batches
from optax_multirate.models import MLP
from optax_multirate.two_regimes import two_regimes

logger = logging.getLogger(__name__)

NAME = "two_regimes"
FEATURES = (256, 256)
BATCH_SIZE = 64
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9  # of the schedule arms; the large step runs without (the paper's regime)
SMALL_LR = 1e-3  # adam's customary rate in the small-step regime, as in two_regimes_sgd
STEP_DROPS = (0.5, 0.75)  # step decay: x0.1 at these fractions of the budget
GOAL_PT, GOAL_SETS = -0.3, 2
EPOCHS = {"mnist1d": 30, "mnist_subset": 12, "digits": 40}
# Grids, most conservative first: N = 12 configurations for every selected arm. Their rate
# ranges were set from validation runs on the selection seeds, so that each arm's best rate
# lies inside its grid.
GRIDS = {
    "two_regimes": [
        {"learning_rate": lr, "large_fraction": f, "small": small}
        for lr in (0.2, 0.5, 1.0) for f in (0.8, 0.6) for small in ("adam", "sgd")
    ],
    "best_schedule": [
        {"learning_rate": lr, "schedule": kind}
        for lr in (0.03, 0.1, 0.2, 0.3) for kind in ("step", "cosine", "linear")
    ],
    "schedule_free": [
        {"learning_rate": lr, "warmup_fraction": w}
        for lr in (0.1, 0.3, 1.0, 2.0, 4.0, 10.0) for w in (0.05, 0.0)
    ],
}  # fmt: skip
QUICK_GRIDS = {  # one configuration each: the code path only
    "two_regimes": [{"learning_rate": 0.2, "large_fraction": 0.8, "small": "adam"}],
    "best_schedule": [{"learning_rate": 0.1, "schedule": "cosine"}],
    "schedule_free": [{"learning_rate": 1.0, "warmup_fraction": 0.05}],
}
QUICK = {"sets": ("digits",), "examples": 512, "epochs": 2}  # every set runs the same code

CLAIM = (
    "Leclerc & Madry (arXiv 2002.10376), abstract and introduction: SGD training passes "
    "through a large-step regime that optimizes poorly but drives generalization, and a "
    "small-step regime that optimizes fast, convex-like, but generalizes poorly on its own; "
    "treating the regimes separately, with an algorithm specialized to each, simplifies "
    "schedules considerably. No number from the paper is available. Our goal: the two-regime "
    f"arm within {-GOAL_PT} points of the best tuned schedule (step, cosine or linear decay) "
    f"on at least {GOAL_SETS} of 3 sets, with the same number of configurations tried; the "
    "comparison with schedule-free SGD reported with its interval."
)


# ----------------------------------------------------------------------------- optimizers


def switch_step(large_fraction: Any, total: int) -> Any:
    """``round(large_fraction * total)`` in float32, traced or not (the same integer)."""
    if _checks.is_traced(large_fraction):
        return jax.numpy.round(jax.numpy.float32(large_fraction) * total).astype(np.int32)
    return int(np.round(np.float32(large_fraction) * np.float32(total)))


def _large(learning_rate: Any) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(learning_rate))


def _small(learning_rate: Any, small: str) -> optax.GradientTransformation:
    tx = optax.adam(SMALL_LR) if small == "adam" else optax.sgd(learning_rate / 10.0)
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), tx)


def make_two_regimes(learning_rate, large_fraction, small, *, total, switch_at=None):
    """``two_regimes``: the large step until ``round(large_fraction * total)``, then the
    small one; ``switch_at`` overrides the switch (0: ``small_only``)."""
    at = switch_step(large_fraction, total) if switch_at is None else switch_at
    return two_regimes(_large(learning_rate), _small(learning_rate, small), switch_step=at)


def make_schedule(learning_rate, schedule, *, total):
    """SGD with momentum under a step, cosine or linear decay from ``learning_rate``."""
    if schedule == "step":
        drops = {round(f * total): 0.1 for f in STEP_DROPS}
        sched = optax.piecewise_constant_schedule(learning_rate, drops)
    else:
        sched = protocol.fitted_schedule({"learning_rate": learning_rate, "schedule": schedule},
                                         total)  # fmt: skip
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                       optax.sgd(sched, momentum=MOMENTUM))  # fmt: skip


def make_schedule_free(learning_rate, warmup_fraction, *, total):
    """``schedule_free_sgd`` (b1 = 0.9), with a linear warmup over a fraction of the budget."""
    warmup = round(warmup_fraction * total) or None
    return optax.contrib.schedule_free_sgd(learning_rate, warmup_steps=warmup,
                                           weight_decay=WEIGHT_DECAY)  # fmt: skip


def _eval_schedule_free(opt_state: Any, params: Any) -> Any:
    return optax.contrib.schedule_free_eval_params(opt_state, params)


# ------------------------------------------------------------------------------- one set


class _Set:
    """One set's splits, model and budget, and its runs."""

    def __init__(self, name: str, quick: bool):
        self.name, self.prefix = name, _sets.PREFIX[name]
        data, self.record = _sets.load(name, quick_examples=QUICK["examples"] if quick else None)
        self.num_classes = data.num_classes
        self.splits = protocol.three_splits(data)
        self.epochs = QUICK["epochs"] if quick else EPOCHS[name]
        self.spe = num_batches(self.splits.train, BATCH_SIZE)
        self.total = self.spe * self.epochs
        self.model = MLP(FEATURES, num_classes=data.num_classes)
        self.trainer = _sets.Trainer(self.model, self.splits.train, batch_size=BATCH_SIZE,
                                     epochs=self.epochs)  # fmt: skip
        self.makers = {
            "two_regimes": lambda **c: make_two_regimes(**c, total=self.total),
            "best_schedule": lambda **c: make_schedule(**c, total=self.total),
            "schedule_free": lambda **c: make_schedule_free(**c, total=self.total),
            "small_only": lambda **c: make_two_regimes(**c, total=self.total, switch_at=0),
            "large_only": lambda **c: _large(c["learning_rate"]),
        }

    def arm(self, name: str) -> str:
        return self.prefix + name

    def _run(self, arm: str, config: Mapping[str, Any], seed: int, test: Any = None):
        key = (arm, json.dumps(config, sort_keys=True))
        make = lambda: self.makers[arm](**config)  # noqa: E731
        kw = {"eval_params": _eval_schedule_free} if arm == "schedule_free" else {}
        if test is None:
            return self.trainer.outcome(key, make, seed, self.splits.validation, **kw)
        return {"dataset": self.name, **self.trainer.final(key, make, seed, test, **kw)}

    def select(self, grids: Mapping[str, list], seeds: Sequence[int]) -> dict[str, dict]:
        """The records of the three selected arms and of the two inheriting controls."""
        out = {}
        for arm, grid in grids.items():
            run = (lambda c, s, arm=arm: self._run(arm, c, s)) if arm == "schedule_free" else None
            out[self.arm(arm)] = _sets.select(
                self.arm(arm), grid, self.makers[arm], self.trainer, self.splits.validation,
                final_seeds=seeds, num_classes=self.num_classes, run=run)  # fmt: skip
        for control in ("small_only", "large_only"):
            out[self.arm(control)] = protocol.inherit(out, self.arm("two_regimes"))
        return out

    def final_arms(self) -> dict[str, Callable]:
        return {
            self.arm(arm): (lambda c, s, t, arm=arm: self._run(arm, c, s, t))
            for arm in ("two_regimes", "best_schedule", "schedule_free", "small_only",
                        "large_only")
        }  # fmt: skip

    def config(self) -> dict[str, Any]:
        return {**self.record, "splits": self.splits.record, "epochs": self.epochs,
                "steps_per_epoch": self.spe, "total_steps": self.total}  # fmt: skip


# -------------------------------------------------------------------------------- summary


DELTA_KEYS = {
    "best_schedule": "{}accuracy_delta_vs_best_schedule_pt",
    "schedule_free": "{}accuracy_delta_vs_schedule_free_pt",
    "small_only": "{}small_only_accuracy_delta_pt",
    "large_only": "{}large_only_accuracy_delta_pt",
}


def _arm_runs(runs: Sequence[Mapping[str, Any]], arm: str) -> list[Mapping[str, Any]]:
    return [r for r in runs if r["arm"] == arm]


def _mean(runs: Sequence[Mapping[str, Any]], arm: str, fn: Callable[[Mapping], float]):
    vals = [fn(r) for r in _arm_runs(runs, arm)]
    return statistics.fmean(vals) if vals else None


def summarize(sets: Sequence[_Set], selection: Mapping[str, Any], runs: Sequence[Mapping]):
    """Per set: the method against each reference and control, configs, divergence; the goal."""
    s: dict[str, Any] = {}
    for st in sets:
        p, mine = st.prefix, [r for r in runs if r["dataset"] == st.name]
        tr = st.arm("two_regimes")
        for ref in ("best_schedule", "schedule_free"):
            _sets.put_delta(s, DELTA_KEYS[ref].format(p), mine, tr, st.arm(ref))
        for control in ("small_only", "large_only"):
            _sets.put_delta(s, DELTA_KEYS[control].format(p), mine, st.arm(control), tr)
        s[p + "configs_tried"] = selection[tr]["configs_tried"]
        s[p + "best_schedule_configs_tried"] = selection[st.arm("best_schedule")]["configs_tried"]
        s[p + "schedule_free_configs_tried"] = selection[st.arm("schedule_free")]["configs_tried"]
        s[p + "diverged_runs"] = protocol.diverged_runs(mine)
        for arm in ("two_regimes", "best_schedule", "schedule_free", "small_only", "large_only"):
            s[f"{p}{arm}_accuracy"] = _mean(mine, st.arm(arm), lambda r: r["final_accuracy"])
            s[f"{p}{arm}_train_loss"] = _mean(mine, st.arm(arm),
                                              lambda r: r["history"][-1]["train_loss"])  # fmt: skip
        delta = s[p + "accuracy_delta_vs_best_schedule_pt"]
        s[p + "goal_met"] = bool(
            delta is not None
            and delta >= GOAL_PT
            and s[p + "configs_tried"] == s[p + "best_schedule_configs_tried"]
        )
    s["goal_met_sets"] = sum(s[st.prefix + "goal_met"] for st in sets)
    s["goal_met"] = s["goal_met_sets"] >= GOAL_SETS
    s["diverged_runs"] = protocol.diverged_runs(runs)
    return s


def _f(x: Any, spec: str = "+.2f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)  # None or nan


_ci = protocol.delta_text  # mean [low, high]


def table(sets: Sequence[_Set], selection: Mapping[str, Any], s: Mapping[str, Any]) -> str:
    lines = []
    for st in sets:
        p, r = st.prefix, st.splits.record
        lines += [
            f"### {st.name} ({r['train_examples']} train / {r['validation_examples']} val / "
            f"{r['test_examples']} test, {st.epochs} epochs, {st.total} updates)",
            "",
            "| arm | configs tried | chosen | test accuracy (%) | final train loss "
            "| paired delta (pt) [95% CI] |",
            "| --- | ---: | --- | ---: | ---: | --- |",
        ]
        for arm in ("two_regimes", "best_schedule", "schedule_free", "small_only", "large_only"):
            rec, acc = selection[st.arm(arm)], s[f"{p}{arm}_accuracy"]
            vs = "-" if arm == "two_regimes" else _ci(s, DELTA_KEYS[arm].format(p))
            lines.append(
                f"| {arm} | {rec['configs_tried'] or 'inherits'} | {rec['chosen']} | "
                f"{_f(None if acc is None else 100 * acc, '.2f')} | "
                f"{_f(s[f'{p}{arm}_train_loss'], '.4f')} | {vs} |"
            )
        lines += [
            "",
            f"two_regimes - best_schedule: {_ci(s, p + 'accuracy_delta_vs_best_schedule_pt')} "
            f"pt; two_regimes - schedule_free: {_ci(s, p + 'accuracy_delta_vs_schedule_free_pt')}"
            f" pt. Goal (>= {GOAL_PT} pt with as many configurations): "
            f"**{'met' if s[p + 'goal_met'] else 'not met'}**. Diverged final runs: "
            f"{s[p + 'diverged_runs']}.",
            "",
        ]
    lines.append(
        "Paired deltas: two_regimes minus the reference (best_schedule, schedule_free); the "
        "control minus two_regimes (small_only, large_only). "
        f"Goal met on {s['goal_met_sets']} of 3 sets (needed: {GOAL_SETS})."
    )
    lines += [
        "",
        "Selection (final-epoch validation accuracy on the two selection seeds, the score "
        "their mean; the controls inherit two_regimes' choice, the chosen configuration in "
        "bold):",
        "",
        protocol.selection_table(selection),
    ]
    return "\n".join(lines)


def make_plot(sets: Sequence[_Set], runs: Sequence[Mapping[str, Any]]):
    """Top: test accuracy against train time per arm; bottom: training loss per epoch."""

    def plot(fig: Any) -> None:
        fig.set_size_inches(15, 8)
        for i, st in enumerate(sets):
            mine = [r for r in runs if r["dataset"] == st.name]
            ax = fig.add_subplot(2, len(sets), i + 1)
            protocol.plot_accuracy_time(mine, title=st.name)(_sets.on_axis(ax))
            ax = fig.add_subplot(2, len(sets), len(sets) + i + 1)
            for n, arm in enumerate(dict.fromkeys(r["arm"] for r in mine)):
                hists = [r["history"] for r in _arm_runs(mine, arm)]
                loss = np.mean([[h["train_loss"] for h in hist] for hist in hists], 0)
                ax.semilogy(np.arange(1, len(loss) + 1), loss, color=f"C{n}", label=arm)
            ax.set_xlabel("epoch")
            ax.set_ylabel("training loss (mean over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

    return plot


# ----------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the two-regimes benchmark and writes its results.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """
    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=len(protocol.FINAL_SEEDS))
    if args.epochs is not None:
        raise ValueError("--epochs is not supported: each set declares its own epochs")
    t0 = time.perf_counter()
    grids = QUICK_GRIDS if args.quick else GRIDS
    names = QUICK["sets"] if args.quick else tuple(_sets.PREFIX)
    sets = [_Set(name, args.quick) for name in names]
    selection: dict[str, Any] = {}
    for st in sets:
        selection.update(st.select(grids, seeds))
        logger.info("%s: selection done at %.0f s", st.name, time.perf_counter() - t0)
    n_configs = protocol.check_equal_budgets(selection)
    runs: list[dict[str, Any]] = []
    for st in sets:
        runs += protocol.final_runs(st.final_arms(), selection, st.splits.test,
                                    num_classes=st.num_classes, seeds=seeds)  # fmt: skip
        logger.info("%s: final runs done at %.0f s", st.name, time.perf_counter() - t0)
    summary = summarize(sets, selection, runs)
    _sets.fill_skipped(summary, names)
    summary["configs_per_arm"] = n_configs
    summary["total_time_s"] = time.perf_counter() - t0
    config = {
        "model": f"MLP {FEATURES} ReLU",
        "sets": {st.prefix: st.config() for st in sets},
        "batch_size": BATCH_SIZE,
        "weight_decay": f"coupled L2 {WEIGHT_DECAY} in every arm",
        "arms": {
            "two_regimes": "two_regimes(chain(l2, sgd(learning_rate)), chain(l2, small), "
            "switch_step=round(large_fraction * T)); small: adam(1e-3) or sgd(learning_rate/10)",
            "best_schedule": f"chain(l2, sgd(schedule, momentum={MOMENTUM})); schedule: step "
            f"(x0.1 at {STEP_DROPS} of T), cosine or linear decay to 0 from learning_rate",
            "schedule_free": "optax.contrib.schedule_free_sgd(learning_rate, warmup_steps="
            "round(warmup_fraction * T) or None, b1=0.9, weight_decay=5e-4), evaluated at "
            "optax.contrib.schedule_free_eval_params",
            "small_only": "two_regimes' choice with switch_step=0",
            "large_only": "two_regimes' choice, chain(l2, sgd(learning_rate)) throughout",
        },
        "grids": grids,
        "configs_per_arm": n_configs,
        "selection_seeds": list(protocol.SELECTION_SEEDS),
        "seeds": seeds,
        "selection_score": "final-epoch validation accuracy, mean over the selection seeds",
        "selection_runner": {"two_regimes": "run_batched", "best_schedule": "run_batched",
                             "schedule_free": "fit (evaluated at schedule_free_eval_params)"},
        "divergence_threshold": protocol.divergence_threshold(10),
    }  # fmt: skip
    harness.write_results(NAME, args=args, config=config, runs=runs, summary=summary,
                          claim_md=CLAIM, table_md=table(sets, selection, summary),
                          plot=make_plot(sets, runs), argv=argv, selection=selection)  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
