"""One table over every benchmark: the paper's claim, our figure, the command, the date.

Reads every ``benchmarks/results/*.json`` (full runs only: ``*.quick.json`` and device runs
``<name>.<device>.json`` are listed apart) and writes ``benchmarks/results/overview.md``,
which the docs include, and ``benchmarks/results/which_method.md``
(:mod:`benchmarks.which_method`). Nothing here measures anything: it only gathers what the
benchmarks recorded. Run: ``python -m benchmarks.overview``.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib

from benchmarks import harness

log = logging.getLogger(__name__)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# benchmark -> (method, the paper's claim, summary keys that carry our figure, goal)
ROWS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "baseline": (
        "plain optax (reference)",
        "-",
        ("final_accuracy", "final_accuracy_std", "diverged_runs", "train_time_s", "step_time_ms"),
        "mean test accuracy >= 0.95",
    ),
    "step_cost": (
        "phase protocol",
        "head-only / bias-only gradients cost ~0.05-0.11 / 0.54-0.86 of a full step",
        (
            "head_only_time_ratio",
            "head_only_flop_ratio",
            "bias_only_time_ratio",
            "bias_only_flop_ratio",
            "dispatch_overhead_ratio",
            "goal_met",
            "resnet_goal_met",
            "linen_multirate_step_time_ratio",
            "nnx_multirate_step_time_ratio",
        ),
        "time/FLOP ratio <= 1.1 (CNN, ResNet); dispatch overhead <= 1.02",
    ),
    "multirate_transfer": (
        "multirate (Vlaar & Leimkuhler)",
        "fine-tuning in about half the time at equal accuracy (ResNet-50: 0.50 of the time)",
        (
            "best_arm",
            "time_ratio",
            "predicted_time_ratio",
            "accuracy_delta_pt",
            "equal_time_accuracy_delta_pt",
            "head_only_accuracy_delta_pt",
            "baseline_half_budget_delta_pt",
            "diverged_runs",
        ),
        "time_ratio <= 0.5, accuracy_delta_pt >= -0.5, equal_time_accuracy_delta_pt > 0",
    ),
    "multirate_transfer_map": (
        "multirate: where it pays (pretraining strength x k, 3 seeds a cell)",
        "a strong backbone that needs small changes (the claim's regime)",
        (
            "cells",
            "cells_goal_met",
            "cells_equal_time_positive",
            "strong_k2_equal_time_accuracy_delta_pt",
            "none_k10_accuracy_delta_pt",
            "diverged_runs",
        ),
        "a regime where time_ratio <= 0.5 at equal accuracy",
    ),
    "multirate_scratch": (
        "multirate from scratch",
        "random slow subgroups regularize (lower test loss than SGD); several time scales "
        "keep the best clean accuracy and memorize the patch",
        (
            "subgroups_test_loss_delta",
            "subgroups_accuracy_delta_pt",
            "overfit_gap_pt",
            "dropout_accuracy_delta_pt",
            "timescales_clean_accuracy_delta_pt",
            "timescales_patch_accuracy_delta_pt",
            "diverged_runs",
        ),
        "report",
    ),
    "wus": (
        "WUS / WUS+LR (Safayenikoo & Akturk)",
        "54% / 50% less training time on CIFAR-10 (CPU), accuracy virtually the same",
        (
            "time_ratio",
            "accuracy_delta_pt",
            "wuslr_time_ratio",
            "wuslr_accuracy_delta_pt",
            "skipped_step_fraction",
            "predicted_time_ratio",
            "equal_time_accuracy_delta_pt",
            "bias_only_step_time_ratio",
            "diverged_runs",
        ),
        "skipped_step_fraction >= 0.5, accuracy_delta_pt >= -1.0, time_ratio within 0.03 of "
        "predicted, equal_time_accuracy_delta_pt >= 0",
    ),
    "lerac": (
        "LeRaC (Croitoru et al.)",
        "beats conventional training on every data set, at no extra training time",
        (
            "digits_accuracy_delta_pt",
            "mnist_accuracy_delta_pt",
            "mnist1d_accuracy_delta_pt",
            "sets_above_0",
            "step_time_ratio",
        ),
        "95% interval above 0 on >= 2 of 3 sets; step_time_ratio <= 1.02",
    ),
    "two_regimes": (
        "two regimes (Leclerc & Madry)",
        "a regime-specialized optimizer replaces hand-tuned step schedules",
        (
            "mnist1d_accuracy_delta_vs_best_schedule_pt",
            "mnist_accuracy_delta_vs_best_schedule_pt",
            "digits_accuracy_delta_vs_best_schedule_pt",
            "mnist1d_accuracy_delta_vs_schedule_free_pt",
            "mnist1d_configs_tried",
            "mnist1d_best_schedule_configs_tried",
        ),
        ">= -0.3 pt vs the best schedule on >= 2 of 3 sets, with equal configs",
    ),
    "growing": (
        "growing networks (Yuan, Savarese & Maire)",
        "accuracy comparable to the fixed large model with substantial compute and wall-clock "
        "savings (about 0.83 of the wall-clock time)",
        (
            "time_ratio",
            "predicted_time_ratio",
            "time_to_accuracy_ratio_with_compile",
            "time_to_accuracy_seeds_reached",
            "flop_ratio",
            "accuracy_delta_pt",
            "diverged_runs",
            "cnn_time_ratio",
            "cnn_time_to_accuracy_ratio_with_compile",
            "cnn_accuracy_delta_pt",
            "cnn_diverged_runs",
        ),
        "time_to_accuracy_ratio_with_compile <= 0.75, accuracy_delta_pt >= -0.5 (MLP)",
    ),
    "combos": (
        "pairs of methods in one chain",
        "-",
        ("pairs_run", "pairs_failed", "diverged_runs"),
        "every pair runs",
    ),
}


def _figure(key: str, summary: dict) -> str:
    """``key value``, with the 95% interval beside a ``_pt`` delta that has one."""
    text = f"`{key}` {_fmt(summary[key])}"
    if key.endswith("_pt"):
        lo, hi = (summary.get(key[: -len("_pt")] + s) for s in ("_ci_low_pt", "_ci_high_pt"))
        if lo is not None and hi is not None:
            text += f" [{_fmt(lo)}, {_fmt(hi)}]"
    return text


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build(results_dir: pathlib.Path) -> str:
    """The overview Markdown for the results in ``results_dir``."""
    lines = [
        "# Overview of measured results",
        "",
        "Generated by `python -m benchmarks.overview` from `benchmarks/results/*.json`; every "
        "figure comes from the command in its row.",
        "",
        "A figure ending in `_pt` is a paired difference in percentage points, with its 95% "
        "interval in brackets. *Protocol* says whether the run selected every arm's "
        "hyperparameters on validation (the comparison protocol of `benchmarks/protocol.py`); a "
        "run without it is older and its comparisons are not fair in that sense.",
        "",
        "| benchmark | method | the paper's claim | our figures | our goal | protocol | command "
        "| date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    others = []
    for path in sorted(results_dir.glob("*.json")):
        stem = path.name[: -len(".json")]
        if "." in stem:
            others.append(path.name)
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", path, e)
            continue
        method, claim, keys, goal = ROWS.get(stem, (stem, "-", (), "-"))
        summary = data.get("summary", {})
        figs = "; ".join(_figure(k, summary) for k in keys if k in summary)
        if not keys:
            figs = "; ".join(f"`{k}` {_fmt(v)}" for k, v in list(summary.items())[:6])
        machine = data.get("machine", {})
        dev = machine.get("device", "cpu")
        lines.append(
            f"| {stem} | {method} | {claim} | {figs or '-'} | {goal} | "
            f"{'yes' if 'selection' in data else 'no'} | "
            f"`{data.get('command', '?')}` | {str(data.get('date', '?'))[:10]} ({dev}) |"
        )
    missing = [k for k in ROWS if not (results_dir / f"{k}.json").exists()]
    if missing:
        lines += ["", "Not yet measured: " + ", ".join(f"`{m}`" for m in missing) + "."]
    if others:
        lines += [
            "",
            "Other result files (quick smoke runs, device runs): "
            + ", ".join(f"`{o}`" for o in others)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--out", default=None, help="default: <results-dir>/overview.md")
    args = ap.parse_args(argv)
    results_dir = pathlib.Path(args.results_dir)
    text = build(results_dir)
    harness.write_text(pathlib.Path(args.out) if args.out else results_dir / "overview.md", text)
    if args.out is None:  # the "which method when" page reads the same files
        from benchmarks import which_method

        which_method.write(results_dir)
    return text


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
