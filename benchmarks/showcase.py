"""The main job: the library's best fairly measured method beside plain optax, in minutes.

What it runs and why. Every method of the library was compared with plain optax under one
protocol (:mod:`benchmarks.protocol`: step sizes selected on validation with equal budgets,
paired seeds, intervals, and an *equal-time* control: plain optax trained for as many steps as
fit in the method's time). Among the methods that claim to save training time, the largest
equal-time figure belongs to multirate fine-tuning (the pretrained backbone updated once
every ``k`` steps, the head every step). Which ``k`` is read from
``benchmarks/results/multirate_transfer.json`` when the job starts: the arm with the largest
``k{k}_equal_time_accuracy_delta_pt``. No method met its paper's claim there; this job shows
the best one as measured, and says so.

The job, with the configurations the benchmark selected on validation (nothing is tuned here):

* ``train_all``: plain optax SGD with momentum, every param, the whole budget.
* ``k<k>``: multirate, through the library's phased step (no backward pass into the
  backbone on the steps that only update the head).
* ``train_all_equal_time``: plain optax for as many steps as fit in the multirate arm's
  mean train time in *this* run, its schedule fitted to that budget.

It prints a table (arm, configuration, test accuracy with its 95% interval over the seeds,
train time, time ratio, the deltas with intervals) and writes ``showcase.{json,md,png}``
into a fresh folder, ``runs/<date>-showcase/`` (or ``--out-dir``); it never writes under
``benchmarks/results``.

Inputs: the MNIST-1D transfer task of :mod:`benchmarks.transfer_task` (generated offline,
cached as a TFDS data set after the first run) and the backbone pretrained on its source
digits, committed as ``benchmarks/pretrained/mnist1d_conv1d.msgpack``, made by
``python -m benchmarks.showcase --pretrain`` (the benchmark's own pretraining: 12 epochs of
SGD on digits 0-4). Nothing is downloaded.

Run: ``python -m benchmarks.showcase`` (10 paired seeds, about 2 minutes on 2 CPU cores),
``--seeds N``, ``--quick`` (a smoke run of seconds on a small task).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import pathlib
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from benchmarks import harness, protocol
from benchmarks import multirate_transfer as mt
from benchmarks import transfer_task as tt

logger = logging.getLogger(__name__)

NAME = "showcase"
ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "results" / f"{mt.NAME}.json"
CHECKPOINT = ROOT / "benchmarks" / "pretrained" / "mnist1d_conv1d.msgpack"
FULL_SEEDS = 10
QUICK_SEEDS = 2


@dataclasses.dataclass(frozen=True)
class Task:
    """The sizes of a run: the benchmark's full task, or a small one for ``--quick``."""

    num_samples: int
    target_train: int
    epochs: int


FULL = Task(num_samples=mt.FULL.num_samples, target_train=mt.FULL.target_train, epochs=4)
QUICK = Task(num_samples=2_000, target_train=256, epochs=1)


# ------------------------------------------------------------------------------ the choice


def best_method(results_dir: pathlib.Path = SOURCE.parent) -> dict[str, Any]:
    """The arm this job runs: the top of :func:`benchmarks.which_method.equal_time_ranking`.

    That ranking keeps the equal-time figures made under the protocol by arms that took less
    time than plain optax, in benchmarks where no final run diverged, best first. This job
    can run the transfer benchmark's multirate arms; the configurations are the ones that
    benchmark selected on validation.

    Returns:
      ``{"k", "equal_time_accuracy_delta_pt", "time_ratio", "configs", "date"}`` where
      ``configs`` maps this job's arms to their configurations.

    Raises:
      RuntimeError: if the best figure is not a multirate arm of the transfer benchmark (the
        results changed: the job must be extended to run that method).
    """
    from benchmarks import which_method

    ranking = which_method.equal_time_ranking(results_dir)
    if not ranking:
        raise RuntimeError(f"no equal-time figure in {results_dir} counts: nothing to show")
    top = ranking[0]
    match = re.fullmatch(r"k(\d+)_equal_time_accuracy_delta_pt", top.key)
    if top.benchmark != mt.NAME or match is None:
        raise RuntimeError(
            f"the best equal-time result is now {top.key} of {top.benchmark} "
            f"({top.delta_pt:+.2f} pt); this job runs the multirate arms of {mt.NAME} only"
        )
    source = json.loads((results_dir / f"{mt.NAME}.json").read_text())
    k, sel = int(match.group(1)), source["selection"]
    return {
        "k": k,
        "equal_time_accuracy_delta_pt": top.delta_pt,
        "time_ratio": top.time_ratio,
        "date": source["date"],
        "configs": {
            "train_all": sel["train_all"]["chosen"],
            f"k{k}": sel[f"k{k}"]["chosen"],
            "train_all_equal_time": sel[f"train_all_equal_time_k{k}"]["chosen"],
        },
    }


# ------------------------------------------------------------------------ the backbone file


def pretrain_backbone(argv: Sequence[str] | None) -> pathlib.Path:
    """Pretrains the benchmark's backbone and writes it (params + a JSON record) beside it."""
    from flax import serialization

    s = mt.FULL
    task = tt.make_task(num_samples=s.num_samples, seed=mt.GENERATOR_SEED,
                        target_train=s.target_train)  # fmt: skip
    model = tt.Conv1DNet(s.features, num_classes=len(tt.SOURCE_CLASSES))
    pre = tt.pretrain(model, task.source, epochs=s.pretrain.epochs, examples=s.pretrain.examples,
                      learning_rate=s.pretrain_lr, batch_size=s.pretrain_batch_size)  # fmt: skip
    record = {
        "command": harness.command_line(argv, NAME),
        "date": _now(),
        "machine": harness.machine_info(),
        "versions": harness.versions(),
        "git_commit": harness.git_commit(ROOT),
        "model": f"Conv1DNet(features={s.features}, num_classes={len(tt.SOURCE_CLASSES)})",
        "dataset": task.record,
        "pretrain": {"level": s.pretrain.name, **pre.record},
        "source_test_accuracy": pre.accuracy,
    }
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    data = serialization.to_bytes(jax.device_get(pre.params))
    for path, write in ((CHECKPOINT, lambda p: p.write_bytes(data)),
                        (CHECKPOINT.with_suffix(".json"),
                         lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))):  # fmt: skip
        tmp = path.with_name(f".{path.name}.tmp")
        write(tmp)
        tmp.replace(path)
    logger.info("wrote %s (source test accuracy %.4f)", CHECKPOINT, pre.accuracy)
    return CHECKPOINT


def load_backbone(num_classes: int) -> tuple[tt.Backbone, dict[str, Any]]:
    """The committed backbone and its record.

    Raises:
      FileNotFoundError: if the checkpoint is missing (with the command that makes it).
    """
    from flax import serialization

    if not CHECKPOINT.exists():
        raise FileNotFoundError(
            f"{CHECKPOINT} is missing: make it with `python -m benchmarks.showcase --pretrain`"
        )
    record = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    model = tt.Conv1DNet(mt.FULL.features, num_classes=num_classes)
    template = tt.init_model(model, jax.random.PRNGKey(0), jax.numpy.zeros((1, 40)))[0]
    params = serialization.from_bytes(template, CHECKPOINT.read_bytes())
    return tt.Backbone(params), record


# ---------------------------------------------------------------------------------- the run


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fresh_out_dir(out_dir: str | None, root: pathlib.Path = ROOT) -> pathlib.Path:
    """``--out-dir`` if given (it must be empty or new), else ``runs/<date>-showcase[-n]``.

    Raises:
      FileExistsError: if ``out_dir`` holds files already (nothing is written over).

    Examples:
      >>> import tempfile
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> fresh_out_dir(None, d).name.endswith("-showcase")
      True
    """
    if out_dir is not None:
        path = pathlib.Path(out_dir)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"--out-dir {path} is not empty: give a new or empty folder")
        if path.resolve() == (root / harness.DEFAULT_OUT_DIR).resolve():
            raise ValueError(f"--out-dir must not be {harness.DEFAULT_OUT_DIR}")
        return path
    base = root / "runs" / f"{datetime.date.today().isoformat()}-{NAME}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run(args: Any, argv: Sequence[str] | None) -> dict[str, Any]:
    """Runs the three arms and writes the results; returns the summary."""
    task_size = QUICK if args.quick else FULL
    seeds = harness.seeds_from_args(args, full=FULL_SEEDS, quick=QUICK_SEEDS)
    best = best_method()
    k, configs = best["k"], best["configs"]
    arm = f"k{k}"

    task = tt.make_task(num_samples=task_size.num_samples, seed=mt.GENERATOR_SEED,
                        target_train=task_size.target_train)  # fmt: skip
    backbone, pre = load_backbone(len(tt.SOURCE_CLASSES))
    model = tt.Conv1DNet(mt.FULL.features, num_classes=mt.NUM_CLASSES, backbone=backbone)
    bench = mt.Bench(model, protocol.three_splits(task.target), mt.FULL.batch_size, seeds)
    steps = task_size.epochs * (len(bench.splits.train) // bench.batch_size)

    selection = {
        name: {"grid": [], "scores": [], "chosen": dict(c), "configs_tried": 0,
               "from": f"benchmarks/results/{SOURCE.name}"}
        for name, c in configs.items()
    }  # fmt: skip
    runs = protocol.final_runs(
        {"train_all": bench.final(tt.train_all_tx, steps, "full"),
         arm: bench.final(tt.multirate_tx, steps, "host")},
        selection, bench.splits.test, num_classes=mt.NUM_CLASSES, seeds=seeds,
    )  # fmt: skip
    budget = protocol.equal_time_budget(runs, arm, "train_all")
    runs += protocol.final_runs(
        {"train_all_equal_time": bench.final(tt.train_all_tx, budget.steps, "full")},
        selection, bench.splits.test, num_classes=mt.NUM_CLASSES, seeds=seeds,
    )  # fmt: skip
    summary = _summary(runs, arm, budget)
    config = {
        "method": f"multirate fine-tuning, k={k} (head every step, backbone once per cycle)",
        "why": "the top of the equal-time ranking (results under the protocol on >= 10 "
        "seeds, arms faster than plain optax, no diverged run): "
        f"{arm}_equal_time_accuracy_delta_pt {best['equal_time_accuracy_delta_pt']:+.2f} in "
        f"benchmarks/results/{SOURCE.name} (date {best['date']}); see docs/which_method.md",
        "configs_from": f"benchmarks/results/{SOURCE.name}",
        "dataset": task.record,
        "splits": bench.splits.record,
        "backbone": {"file": str(CHECKPOINT.relative_to(ROOT)), **pre},
        "batch_size": bench.batch_size,
        "epochs": task_size.epochs,
        "steps": steps,
        "equal_time_steps": budget.steps,
        "seeds": seeds,
    }
    table = _table(summary, runs, selection, arm, steps, budget, seeds)
    paths = harness.write_results(
        NAME, args=args, config=config, runs=runs, summary=summary, claim_md=mt.CLAIM,
        table_md=table, argv=argv, selection=selection,
        plot=protocol.plot_accuracy_time(
            runs, equal_time_s=budget.seconds, equal_time_arm="train_all_equal_time",
            title=f"Fine-tuning a pretrained 1D CNN: multirate k={k} vs plain optax"),
    )  # fmt: skip
    print(table)
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    return summary


def _acc(runs: Sequence[Mapping[str, Any]], arm: str) -> tuple[float, float | None, float | None]:
    accs = [100 * r["final_accuracy"] for r in runs if r["arm"] == arm]
    return (statistics.fmean(accs), *protocol.t_interval(accs))


def _summary(runs: list[dict], arm: str, budget: protocol.StepBudget) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for name in ("train_all", arm, "train_all_equal_time"):
        p = "method_" if name == arm else f"{name}_"
        s[p + "accuracy"] = _acc(runs, name)[0] / 100
        s[p + "train_time_s"] = statistics.fmean(r["train_time_s"] for r in runs
                                                 if r["arm"] == name)  # fmt: skip
    s["time_ratio"] = protocol.time_ratio(runs, arm, "train_all")
    s["time_ratio_with_compile"] = protocol.time_ratio_with_compile(runs, arm, "train_all")
    protocol.put_delta(s, "accuracy_delta_pt", protocol.paired_deltas_pt(runs, arm, "train_all"))
    protocol.put_delta(s, "equal_time_accuracy_delta_pt",
                       protocol.paired_deltas_pt(runs, arm, "train_all_equal_time"))  # fmt: skip
    s["equal_time_steps"] = budget.steps
    s["diverged_runs"] = protocol.diverged_runs(runs)
    s["saving_shown"] = bool(
        s["time_ratio"] < 1.0
        and s["equal_time_accuracy_delta_ci_low_pt"] is not None
        and s["equal_time_accuracy_delta_ci_low_pt"] > 0
    )
    return s


def _table(s, runs, selection, arm, steps, budget, seeds) -> str:
    rows = [
        "| arm | configuration (selected on validation by the benchmark) | test accuracy %, "
        "mean [95% CI] | train s (compile excluded) | time ratio to train_all | Δ vs "
        "train_all, pt [95% CI] | diverged |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("train_all", arm, "train_all_equal_time"):
        mean, lo, hi = _acc(runs, name)
        rs = [r for r in runs if r["arm"] == name]
        t = statistics.fmean(r["train_time_s"] for r in rs)
        cfg = ", ".join(f"{k}={v}" for k, v in selection[name]["chosen"].items())
        ratio = f"{protocol.time_ratio(runs, name, 'train_all'):.3f}"
        delta = "—"
        if name != "train_all":
            d: dict[str, Any] = {}
            protocol.put_delta(d, "d_pt", protocol.paired_deltas_pt(runs, name, "train_all"))
            delta = protocol.delta_text(d, "d_pt")
        div = f"{sum(r['diverged'] for r in rs)}/{len(rs)}"
        acc = f"{mean:.2f} [{protocol.number(lo, '.2f')}, {protocol.number(hi, '.2f')}]"
        rows.append(f"| {name} | {cfg} | {acc} | {t:.2f} | {ratio} | {delta} | {div} |")
    lo, hi = (s[k] for k in protocol.ci_keys("equal_time_accuracy_delta_pt"))
    if s["saving_shown"]:
        verdict = "**The saving shows in this run**: "
    else:
        verdict = "**The saving does not show in this run**: "
    verdict += (f"{arm} used {s['time_ratio']:.2f} of train_all's train time "
                f"({s['time_ratio_with_compile']:.2f} with compilation) at "
                f"{s['accuracy_delta_pt']:+.2f} pt; against plain optax given the same time "
                f"({budget.steps} steps) it is "
                f"{protocol.delta_text(s, 'equal_time_accuracy_delta_pt')} pt")  # fmt: skip
    if lo is None or hi is None:
        verdict += " (no interval: too few seeds)."
    elif lo > 0:
        verdict += ": better than stopping plain optax early."
    elif hi < 0:
        verdict += ": stopping plain optax early is better."
    else:
        verdict += ": no better than stopping plain optax early (the interval holds 0)."
    return "\n".join(rows + [
        "",
        verdict,
        "",
        f"{len(seeds)} paired seeds; budget {steps} steps of batch {mt.FULL.batch_size} for "
        f"train_all and {arm}, {budget.steps} for train_all_equal_time (the steps of "
        f"train_all that fit in {arm}'s mean train time, {budget.seconds:.2f} s). No method "
        "of the library met its paper's claim under the fair protocol; this is the best "
        "equal-time result of the benchmarks among arms faster than plain optax "
        "(docs/which_method.md).",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | pathlib.Path:
    """Runs the main job (or ``--pretrain``); returns the summary (or the checkpoint path)."""
    harness.setup_logging()
    p = harness.parser(NAME, "the best fairly measured method of the library beside plain optax")
    p.add_argument("--pretrain", action="store_true",
                   help=f"pretrain the backbone and write {CHECKPOINT.relative_to(ROOT)}")
    p.set_defaults(out_dir=None)
    args = p.parse_args(argv)
    if args.pretrain:
        return pretrain_backbone(argv)
    args.out_dir = str(fresh_out_dir(args.out_dir))
    return run(args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
