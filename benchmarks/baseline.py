"""Baseline: plain optax SGD with momentum, the small CNN, the embedded MNIST subset.

The reference every method's benchmark compares against, and the first command of the README::

    python -m benchmarks.baseline            # full: selection, then 10 seeds; baseline.*
    python -m benchmarks.baseline --quick    # seconds: 2 step sizes, 1,024 examples; .quick.*

The run follows the comparison protocol (:mod:`benchmarks.protocol`): a stratified 15% of the
training data is held out for validation and the test split is read by the final runs only.
The peak step size of a cosine schedule (decaying to 0 over the run) is selected from a grid
of five, most conservative first, by final-epoch validation accuracy over two selection
seeds; the chosen step size then trains on ten final seeds. Every run goes through
:func:`optax_multirate.train.fit`, one at a time: the selection runs of a step size share
its compiled step, each final run compiles its own (``compile_time_s``). (The vmapped
selection runner, :func:`benchmarks.batched.run_batched`, trains inside ``lax.scan``, where
XLA:CPU runs this CNN's step about ten times slower than as a program of its own.) A run whose
loss goes non-finite or ends at or above ``0.9 ln 10`` is flagged as diverged
(``diverged_runs``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import optax

from benchmarks import harness, protocol
from optax_multirate.data import Split, load_dataset, num_batches
from optax_multirate.models import CNN
from optax_multirate.train import Evaluate, ProgressBar, fit, make_train_step

logger = logging.getLogger(__name__)

NAME = "baseline"
GRID = (0.03, 0.05, 0.1, 0.2, 0.3)  # peak step sizes, most conservative first: N = 5
QUICK_GRID = (0.05, 0.1)
MOMENTUM = 0.9
BATCH_SIZE = 128
FEATURES = (16, 32, 64)  # 3x3 convs, each + batch norm + relu + 2x2 max-pool
POOL_AFTER = (0, 1, 2)
BATCH_NORM = True
FULL_EPOCHS = 10
QUICK_TRAIN_EXAMPLES = 1024  # --quick: the first 1,024 training examples,
QUICK_EPOCHS = 2  # two epochs of batch 32 (one epoch of batch 128 ends near chance: diverged)
QUICK_BATCH_SIZE = 32
GOAL = 0.95

CLAIM = (
    "No paper: this is the reference run. Goal: the small CNN reaches a mean test accuracy of "
    f"at least {GOAL:.2f} on the 5,000-digit MNIST subset (4,000 train, of which 15% are held "
    "out for validation; 1,000 test) with plain SGD with momentum, its cosine schedule's peak "
    "step size selected on validation."
)


def _tx(config: dict[str, Any], total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum, the cosine schedule of ``config`` fitted to ``total_steps``."""
    return optax.sgd(protocol.fitted_schedule(config, total_steps), momentum=MOMENTUM)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the baseline benchmark and writes its results.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """
    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=len(protocol.FINAL_SEEDS))
    epochs = harness.epochs_from_args(args, full=FULL_EPOCHS, quick=QUICK_EPOCHS)
    batch_size = QUICK_BATCH_SIZE if args.quick else BATCH_SIZE
    data = load_dataset("mnist_subset")
    if args.quick:
        sub = Split(x=data.train.x[:QUICK_TRAIN_EXAMPLES], y=data.train.y[:QUICK_TRAIN_EXAMPLES])
        data = dataclasses.replace(data, train=sub)
    splits = protocol.three_splits(data)
    model = CNN(
        features=FEATURES,
        pool_after=POOL_AFTER,
        batch_norm=BATCH_NORM,
        num_classes=data.num_classes,
    )
    total_steps = epochs * num_batches(splits.train, batch_size)
    grid = [{"learning_rate": lr} for lr in (QUICK_GRID if args.quick else GRID)]

    # -- selection: every step size on the two selection seeds ------------------------------
    steps = {}  # one train step per configuration, shared by its two selection runs

    def select_run(config: dict[str, Any], seed: int) -> dict[str, Any]:
        key = config["learning_rate"]
        if key not in steps:
            tx = _tx(config, total_steps)
            steps[key] = (tx, make_train_step(model, tx))
        tx, step = steps[key]
        res = fit(model, tx, splits.train, epochs=epochs, batch_size=batch_size, seed=seed,
                  step=step, callbacks=[Evaluate({"val": splits.validation},
                  every_epochs=epochs)])  # fmt: skip
        return {
            "val_accuracy": res.history[-1]["val_accuracy"],
            "train_loss": [row["train_loss"] for row in res.history],
        }

    selection = {
        "baseline": protocol.select(
            "baseline",
            grid,
            select_run,
            final_seeds=seeds,
            num_classes=data.num_classes,
            budget=len(grid),
        )
    }
    protocol.check_equal_budgets(selection)

    # -- final runs: the chosen step size on the final seeds ---------------------------------
    all_step_ms: list[float] = []

    def final(config: dict[str, Any], seed: int, test: Split) -> dict:
        res = fit(model, _tx(config, total_steps), splits.train, epochs=epochs,
                  batch_size=batch_size, seed=seed, callbacks=[Evaluate({"test": test}),
                  ProgressBar(f"baseline seed {seed}")])  # fmt: skip
        all_step_ms.extend(res.step_times_ms.get("full", []))
        return protocol.run_record(res)

    runs = protocol.final_runs({"baseline": final}, selection, splits.test,
                               num_classes=data.num_classes, seeds=seeds)  # fmt: skip
    summary = _summary(runs, all_step_ms, selection["baseline"])
    config = {
        "model": (
            f"CNN(features={FEATURES}, pool_after={POOL_AFTER}, batch_norm={BATCH_NORM}): "
            "3x3 convs, 2x2 max-pools, global average pooling, head"
        ),
        "dataset": "mnist_subset"
        + (f" (first {QUICK_TRAIN_EXAMPLES} train)" if args.quick else ""),
        "splits": splits.record,
        "optimizer": (
            f"optax.sgd(optax.cosine_decay_schedule(learning_rate, {total_steps}), "
            f"momentum={MOMENTUM})"
        ),
        "selection": {
            "grid": "learning_rate (the schedule's peak), most conservative first",
            "configs_per_arm": len(grid),
            "seeds": list(protocol.SELECTION_SEEDS),
            "score": "final-epoch validation accuracy, mean over the selection seeds",
            "runner": "optax_multirate.train.fit, one run at a time",
        },
        "epochs": epochs,
        "steps_per_epoch": num_batches(splits.train, batch_size),
        "batch_size": batch_size,
        "seeds": seeds,
        "divergence_threshold": protocol.divergence_threshold(data.num_classes),
    }
    harness.write_results(
        NAME,
        args=args,
        config=config,
        runs=runs,
        summary=summary,
        claim_md=CLAIM,
        table_md=_table(runs, summary, selection["baseline"], epochs, batch_size),
        plot=protocol.plot_accuracy_time(runs, title="Baseline: SGD + momentum, CNN, MNIST subset"),
        argv=argv,
        selection=selection,
    )
    logger.info("summary: %s", summary)
    return summary


def _summary(
    runs: list[dict[str, Any]], step_ms: list[float], record: dict[str, Any]
) -> dict[str, Any]:
    """The summary: accuracy and times over the final runs (None where none ran)."""
    chosen = record["chosen"]
    summary: dict[str, Any] = {
        "final_accuracy": None,
        "final_accuracy_std": None,
        "train_time_s": None,
        "compile_time_s": None,
        "step_time_ms": harness.median_ms(step_ms),  # over every timed step of every run
        "diverged_runs": protocol.diverged_runs(runs),
        "learning_rate": None if chosen is None else chosen["learning_rate"],
        "configs_tried": record["configs_tried"],
        "goal_accuracy": GOAL,
        "goal_reached": False,
    }
    if runs:
        acc, acc_std = harness.mean_std([r["final_accuracy"] for r in runs])
        summary.update(
            final_accuracy=acc,
            final_accuracy_std=acc_std,
            train_time_s=harness.mean_std([r["train_time_s"] for r in runs])[0],
            compile_time_s=harness.mean_std([r["compile_time_s"] for r in runs])[0],
            goal_reached=acc >= GOAL,
        )
    return summary


def _f(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _table(
    runs: list[dict[str, Any]],
    s: dict[str, Any],
    record: dict[str, Any],
    epochs: int,
    batch_size: int,
) -> str:
    low, high = protocol.t_interval([r["final_accuracy"] for r in runs])
    interval = "n/a" if low is None else f"[{low:.4f}, {high:.4f}]"
    steps = runs[0]["steps"] // epochs if runs else "n/a"
    return "\n".join(
        [
            f"**Selection** ({record['configs_tried']} peak step sizes, final-epoch validation "
            f"accuracy on seeds {' / '.join(map(str, record['seeds']))}, the score their mean; "
            "the chosen one in bold):",
            "",
            protocol.selection_table({"baseline": record}),
            "",
            "**Final runs** (test split, the chosen step size):",
            "",
            "| seed | final test accuracy | train time (s) | compile (s) | median step (ms) "
            "| diverged |",
            "| ---: | ---: | ---: | ---: | ---: | --- |",
            *(
                f"| {r['seed']} | {r['final_accuracy']:.4f} | {r['train_time_s']:.2f} | "
                f"{r['compile_time_s']:.2f} | {r['step_time_ms']:.2f} | {r['diverged']} |"
                for r in runs
            ),
            f"| mean | {_f(s['final_accuracy'], '.4f')} ± {_f(s['final_accuracy_std'], '.4f')} "
            f"| {_f(s['train_time_s'], '.2f')} | {_f(s['compile_time_s'], '.2f')} "
            f"| {_f(s['step_time_ms'], '.2f')} | {s['diverged_runs']} of {len(runs)} |",
            "",
            f"95% t-interval of the mean test accuracy: {interval}. Goal (mean test accuracy "
            f">= {GOAL:.2f}): {'reached' if s['goal_reached'] else 'NOT reached'}. {epochs} "
            f"epochs of {steps} steps, batch {batch_size}; train time excludes compilation and "
            "evaluation. Diverged: a non-finite loss or a last-epoch training loss at or above "
            "0.9 ln 10.",
        ]
    )


if __name__ == "__main__":
    main()
