"""'Which method when': for each question a user brings, the method and what we measured.

Reads the benchmarks' results files and writes ``benchmarks/results/which_method.md``, which
the docs page of the same name includes. Every figure on it is read from a results file and
links to that file and to the command that made it; the text around the figures says what
the measurements show (the regime where a method holds, where it does not, the paper's claim).
Nothing here measures anything. Run: ``python -m benchmarks.which_method`` (also run by
``python -m benchmarks.overview``).

Text templates name summary keys of the question's results file in braces: ``{key}`` is the
value, ``{key:ci}`` the value with its 95% interval (for a ``_pt`` key), ``{key:.2f}`` a
format spec.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from benchmarks import harness

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OUT_NAME = "which_method.md"
MIN_SEEDS = 10  # final seeds a headline comparison runs


@dataclasses.dataclass(frozen=True)
class Question:
    """One question, the method that answers it, and how to read what was measured."""

    question: str
    method: str  # the method and the library's entry points
    benchmark: str  # the results file's stem
    figures: tuple[tuple[str, str], ...]  # (summary key, what it is)
    holds: str  # template: where it holds
    fails: str  # template: where it does not
    paper: str
    headline: int = 0  # the figure the summary table shows
    met: Callable[[Mapping[str, Any]], bool] | None = None  # the claim, where no goal key says


QUESTIONS: tuple[Question, ...] = (
    Question(
        "Fine-tune a pretrained network in less time",
        "multirate: the head fast, the backbone on a k-times-longer clock "
        "(`multirate`, `multirate_sgd`, trained through `PhasedStep` or `fit`)",
        "multirate_transfer",
        (
            ("k2_time_ratio", "k = 2: train time / train-all's"),
            ("k2_accuracy_delta_pt", "k = 2: test accuracy minus train-all's, pt"),
            ("k2_equal_time_accuracy_delta_pt", "k = 2: minus train-all given the same time, pt"),
            ("k5_time_ratio", "k = 5: train time / train-all's"),
            ("k5_accuracy_delta_pt", "k = 5: accuracy minus train-all's, pt"),
            ("k5_equal_time_accuracy_delta_pt", "k = 5: minus train-all given the same time, pt"),
            ("k10_time_ratio", "k = 10: train time / train-all's"),
            ("k10_accuracy_delta_pt", "k = 10: accuracy minus train-all's, pt"),
            ("k10_equal_time_accuracy_delta_pt", "k = 10: minus train-all at equal time, pt"),
            ("head_only_accuracy_delta_pt", "head only (backbone frozen) minus train-all, pt"),
        ),
        "The time side: the phased step skips the backbone's backward pass on k - 1 of every "
        "k steps, so the train time follows the cost model (1 + (k - 1) r) / k for a head-only "
        "step costing r of a full one: k = 2 ran in {k2_time_ratio:.2f} of train-all's time, "
        "k = 10 in {k10_time_ratio:.2f}. Compilation is extra (each phase is its own program: "
        "{k2_time_ratio_with_compile:.2f} of the time with it at k = 2), so it pays on runs "
        "long enough to amortise it. These steps take a few milliseconds, so fixed per-step "
        "costs weigh: on a quiet machine the main job measures 0.8-0.9 at k = 2.",
        "The accuracy side: on our task (a 1D CNN pretrained on MNIST-1D digits 0-4, "
        "fine-tuned on 2,000 signals of digits 5-9) the backbone has to move (head only: "
        "{head_only_accuracy_delta_pt:ci} pt), and moving it k times less often costs accuracy "
        "that plain optax stopped early does not lose: at equal time k = 2 is "
        "{k2_equal_time_accuracy_delta_pt:ci} pt, k = 10 {k10_equal_time_accuracy_delta_pt:ci} pt. "
        "Use it where the backbone needs small changes (a strong backbone, a target close to "
        "its source) and with a small k.",
        "ResNet-50 (ImageNet) to CIFAR-100 in 0.50 of the time at +0.2 pt; DistilBERT to SST-2 "
        "in 0.52 of the time at -0.3 pt.",
        headline=2,
    ),
    Question(
        "Stop hand-tuning a learning-rate schedule",
        "two regimes: a large-step phase, then a small-step phase with its own optimizer "
        "(`two_regimes`, `two_regimes_sgd`)",
        "two_regimes",
        (
            ("mnist1d_accuracy_delta_vs_best_schedule_pt", "MNIST-1D: minus the best schedule, pt"),
            ("mnist_accuracy_delta_vs_best_schedule_pt", "MNIST subset: minus best schedule, pt"),
            ("digits_accuracy_delta_vs_best_schedule_pt", "digits: minus the best schedule, pt"),
            ("mnist1d_accuracy_delta_vs_schedule_free_pt", "MNIST-1D: minus schedule-free SGD, pt"),
            ("mnist_accuracy_delta_vs_schedule_free_pt", "MNIST subset: minus schedule-free, pt"),
            ("digits_accuracy_delta_vs_schedule_free_pt", "digits: minus schedule-free SGD, pt"),
            ("mnist1d_configs_tried", "configurations tried per arm"),
        ),
        "Against `optax.contrib.schedule_free_sgd` with the same number of configurations it "
        "wins on MNIST-1D ({mnist1d_accuracy_delta_vs_schedule_free_pt:ci} pt) and is close "
        "elsewhere: where a user would otherwise drop schedules altogether, it is a fair choice.",
        "Against the best of step, cosine and linear schedules selected with the same budget of "
        "{mnist1d_configs_tried} configurations it loses on every set (digits "
        "{digits_accuracy_delta_vs_best_schedule_pt:ci} pt): a tuned decay still wins by about "
        "half a point on these small tasks.",
        "the two-regime optimizer matches hand-tuned step schedules (CIFAR-10, ResNets).",
    ),
    Question(
        "Skip work late in training",
        "weight update skipping: weights skip updates while accuracy stalls, biases keep "
        "training (`wus`, with the phased step's bias-only program)",
        "wus",
        (
            ("skipped_step_fraction", "fraction of steps that skipped the weights"),
            ("bias_only_step_time_ratio", "bias-only step time / full step time"),
            ("predicted_time_ratio", "predicted time ratio, 1 - (1 - ρ) f"),
            ("time_ratio", "WUS train time / plain optax's"),
            ("accuracy_delta_pt", "WUS minus plain optax, pt"),
            ("equal_time_accuracy_delta_pt", "WUS minus plain optax given the same time, pt"),
            ("wuslr_time_ratio", "WUS+LR train time / plain optax's"),
            ("wuslr_accuracy_delta_pt", "WUS+LR minus plain optax, pt"),
            ("random_windows_accuracy_delta_pt", "random windows (control) minus plain, pt"),
        ),
        "The saving per skipped step is set by the hardware and model: a bias-only step still "
        "runs the forward pass and every activation gradient, here {bias_only_step_time_ratio:.2f}"
        " of a full step, so skipping a fraction {skipped_step_fraction:.2f} of the steps gives a"
        " time ratio of about {predicted_time_ratio:.2f} (measured {time_ratio:.2f}).",
        "Accuracy: {accuracy_delta_pt:ci} pt against plain optax, {equal_time_accuracy_delta_pt:ci}"
        " pt against plain optax given the same time ({diverged_runs} final runs of the "
        "benchmark diverged; a delta against a diverged run measures the divergence, see the "
        "WUS page). The paper's 0.46 needs most steps skipped and a bias-only step far cheaper "
        "than a full one.",
        "54% (WUS) and 50% (WUS+LR) less training time on CIFAR-10 on CPU, 22% on GPU, accuracy "
        "virtually the same.",
        headline=3,
    ),
    Question(
        "Train a bigger network for less compute",
        "growing networks: widen in stages, function-preserving, with variance transfer and "
        "rate adaptation (`grow`, `grow_variables`, `growth_lr_adaptation`, `GrowthStages`)",
        "growing",
        (
            ("predicted_time_ratio", "predicted time ratio (per-width step times)"),
            ("time_ratio", "grown train time / fixed network's"),
            ("time_ratio_with_compile", "the same, compilation of every stage included"),
            ("time_to_accuracy_ratio_with_compile", "time to the target accuracy, with compile"),
            ("flop_ratio", "training FLOPs / fixed network's"),
            ("accuracy_delta_pt", "grown minus fixed network, pt"),
            ("no_vt_accuracy_delta_pt", "without variance transfer minus grown, pt"),
            ("no_lra_accuracy_delta_pt", "without rate adaptation minus grown, pt"),
            ("cnn_time_ratio", "CNN twin: grown train time / fixed network's"),
            ("cnn_time_ratio_with_compile", "CNN twin: the same, compilation included"),
            ("cnn_accuracy_delta_pt", "CNN twin: grown minus fixed network, pt"),
        ),
        "Growth saves compute in proportion to the steps run at small widths (FLOP ratio "
        "{flop_ratio:.2f}); the wall-time saving needs a step that is compute-bound at every "
        "width (time ratio {time_ratio:.2f}, predicted {predicted_time_ratio:.2f}).",
        "Accuracy {accuracy_delta_pt:ci} pt against the fixed network; each stage compiles its "
        "own program ({time_ratio_with_compile:.2f} of the time with compilation), which small "
        "runs do not amortise.",
        "accuracy comparable to the fixed large model at about 0.83 of its wall-clock time.",
        headline=1,
    ),
    Question(
        "A gentler start for deep networks",
        "LeRaC: per-layer rates that start lower with depth and rise to one rate "
        "(`lerac`, `scale_by_lerac`, `depth_labels`)",
        "lerac",
        (
            ("mnist1d_accuracy_delta_pt", "MNIST-1D CNN: LeRaC minus SGD, pt"),
            ("mnist_accuracy_delta_pt", "MNIST subset CNN: LeRaC minus SGD, pt"),
            ("digits_accuracy_delta_pt", "digits MLP: LeRaC minus SGD, pt"),
            ("sets_above_0", "sets (of 3) where the interval is above 0"),
            ("step_time_ratio", "step time / SGD's"),
        ),
        "It costs nothing per step (step time ratio {step_time_ratio:.2f}) and never hurt by "
        "more than half a point.",
        "It did not help on any of our three small sets ({sets_above_0} of 3 with an interval "
        "above 0; MNIST-1D {mnist1d_accuracy_delta_pt:ci} pt): the curriculum lasts 1.25 epochs "
        "and these networks train stably without it.",
        "beats conventional training on every data set (CIFAR, ImageNet-scale, text, audio), "
        "at no extra time.",
    ),
    Question(
        "Regularise training from scratch",
        "multirate subgroups: a random subgroup of every layer's params slow, redrawn each "
        "cycle (`multirate_subgroups`)",
        "multirate_scratch",
        (
            ("subgroups_accuracy_delta_pt", "random subgroups minus SGD, pt"),
            ("dropout_accuracy_delta_pt", "SGD with dropout minus SGD, pt"),
            ("subgroups_test_loss_delta", "test loss, subgroups minus SGD"),
            ("overfit_gap_pt", "SGD's train minus test accuracy, pt"),
        ),
        "SGD overfits on this task (train minus test {overfit_gap_pt:.1f} pt), the regime of "
        "the claim.",
        "Random slow subgroups changed test accuracy by {subgroups_accuracy_delta_pt:ci} pt and "
        "did not lower the "
        "test loss ({subgroups_test_loss_delta:+.3f}); dropout, the usual regulariser, lost "
        "less ({dropout_accuracy_delta_pt:ci} pt). Use dropout or weight decay for this.",
        "random slow subgroups regularise: lower test loss than SGD.",
        met=lambda s: s["subgroups_test_loss_delta"] < 0,
    ),
)


def _fmt(v: Any, spec: str = "") -> str:
    if not spec and isinstance(v, float) and math.isfinite(v):
        spec = ".3g" if abs(v) < 1 else ".2f"
    return harness.number(v, spec)  # n/a for None, nan or inf


def figure(summary: Mapping[str, Any], key: str, spec: str = "") -> str:
    """One figure of ``summary``: ``spec`` is a format spec or ``ci`` (value [low, high]).

    Raises:
      KeyError: if ``key`` is not in ``summary`` (a template names a figure that was not
        measured: fix the template, never the number).

    Examples:
      >>> figure({"a_pt": -0.5, "a_ci_low_pt": -1.0, "a_ci_high_pt": 0.0}, "a_pt", "ci")
      '-0.50 [-1.00, +0.00]'
      >>> figure({"r": 0.4721}, "r", ".2f")
      '0.47'
    """
    if spec == "ci" and key.endswith("_pt") and harness.ci_keys(key)[0] in summary:
        return harness.delta_text(summary, key)
    return _fmt(summary[key], "+.2f" if spec == "ci" else spec)


def render(template: str, summary: Mapping[str, Any]) -> str:
    """Fills ``{key}``, ``{key:spec}`` and ``{key:ci}`` from ``summary``.

    Examples:
      >>> s = {"r": 0.5, "d_pt": 1.0, "d_ci_low_pt": 0.5, "d_ci_high_pt": None}
      >>> render("ratio {r:.2f}, delta {d_pt:ci}", s)
      'ratio 0.50, delta +1.00 [+0.50, n/a]'
    """
    return re.sub(r"\{(\w+)(?::([^}]*))?\}",
                  lambda m: figure(summary, m.group(1), m.group(2) or ""), template)  # fmt: skip


def build(results_dir: pathlib.Path, questions: Sequence[Question] = QUESTIONS) -> str:
    """The page's Markdown from the results files in ``results_dir``."""
    lines = [
        "<!-- written by `python -m benchmarks.which_method`; do not edit by hand -->",
        "",
        "Every figure below is read from the results file named under it and was made by the "
        "command given there, under the comparison protocol (each arm's step sizes selected on "
        "validation with the same budget, ten paired seeds, 95% intervals, an equal-time "
        "control for every time claim). A figure ending in *pt* is a paired difference in "
        "percentage points, with its interval in brackets.",
        "",
        "| question | method | best figure (see its section) | paper's claim met? |",
        "| --- | --- | --- | --- |",
    ]
    ranking = equal_time_ranking(results_dir)
    if ranking:
        top = ranking[0]
        lines[-2:-2] = [
            f"The best equal-time result of any method: `{top.key}` = {top.delta_pt:+.2f} pt "
            f"at a time ratio of {top.time_ratio:.2f} (`benchmarks/results/{top.benchmark}.json`)"
            ": what `python -m benchmarks.showcase` runs. A figure counts when the method took "
            "less time than plain optax, on ten paired seeds, and no final run of its benchmark "
            "diverged.",
            "",
        ]
    sections = []
    for q in questions:
        path = results_dir / f"{q.benchmark}.json"
        if not path.exists():
            lines.append(f"| {q.question} | {q.method.split(':')[0]} | not measured | - |")
            continue
        data = json.loads(path.read_text())
        s = data["summary"]
        named = {k for k, _ in q.figures} | set(re.findall(r"\{(\w+)", q.holds + q.fails))
        if named - set(s):  # an older results file: say so rather than guess
            rerun = data.get("command", f"python -m benchmarks.{q.benchmark}")
            lines.append(f"| {q.question} | {q.method.split(':')[0]} | not measured under the "
                         f"protocol (rerun `{rerun}`) | - |")  # fmt: skip
            continue
        key, what = q.figures[q.headline]
        met = _goal(data) if q.met is None else ("yes" if q.met(s) else "no")
        lines.append(f"| [{q.question}](#{_anchor(q.question)}) | {q.method.split(':')[0]} | "
                     f"{what}: {figure(s, key, 'ci' if key.endswith('_pt') else '')} | "
                     f"{met} |")  # fmt: skip
        sections += [
            "",
            f"## {q.question}",
            "",
            f"**Method**: {q.method}.",
            "",
            "| figure | value | key |",
            "| --- | --- | --- |",
            *(f"| {what} | {figure(s, key, 'ci' if key.endswith('_pt') else '')} | `{key}` |"
              for key, what in q.figures if key in s),  # fmt: skip
            "",
            f"**Where it holds.** {render(q.holds, s)}",
            "",
            f"**Where it does not.** {render(q.fails, s)}",
            "",
            f"**The paper's claim.** {q.paper}",
            "",
            f"Source: `benchmarks/results/{path.name}`, made by `{data['command']}` on "
            f"{str(data['date'])[:10]} ({data.get('machine', {}).get('device', 'cpu')}).",
        ]
    return "\n".join(lines + sections) + "\n"


class EqualTime(NamedTuple):
    """One method arm's equal-time figure: the arm minus plain optax given the arm's time."""

    benchmark: str
    key: str  # the summary key of the figure (``..._equal_time_accuracy_delta_pt``)
    delta_pt: float
    time_ratio: float


def equal_time_ranking(results_dir: pathlib.Path = RESULTS) -> list[EqualTime]:
    """The equal-time figures that count, best first: the main job runs the first one.

    A figure counts when its results were made under the comparison protocol (a ``selection``
    record) with final runs on at least :data:`MIN_SEEDS` paired seeds (a regime map's
    few-seed cells are an exploration, not a comparison), the arm took less time than plain
    optax (``time_ratio`` below 1: an equal-time gain of a slower method saves nothing) and
    no final run of the benchmark diverged (a delta against a diverged run measures the
    divergence, not the method). An unprefixed
    key that repeats a prefixed arm's (the benchmark's best arm) is listed once.

    Examples:
      >>> import tempfile
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> s = {"k2_equal_time_accuracy_delta_pt": -0.7, "k2_time_ratio": 0.66,
      ...      "k5_equal_time_accuracy_delta_pt": -2.3, "k5_time_ratio": 0.52,
      ...      "wus_equal_time_accuracy_delta_pt": 0.1, "wus_time_ratio": 1.05,
      ...      "diverged_runs": 0}
      >>> runs = [{"seed": i} for i in range(10)]
      >>> _ = (d / "m.json").write_text(json.dumps({"selection": {}, "summary": s, "runs": runs}))
      >>> [(e.key, e.delta_pt) for e in equal_time_ranking(d)]
      [('k2_equal_time_accuracy_delta_pt', -0.7), ('k5_equal_time_accuracy_delta_pt', -2.3)]
    """
    out: dict[tuple[str, float, float], EqualTime] = {}
    for path in sorted(results_dir.glob("*.json")):
        if "." in path.name[: -len(".json")]:
            continue  # quick and device runs
        data = json.loads(path.read_text())
        s = data.get("summary", {})
        seeds = {r.get("seed") for r in data.get("runs", [])}
        if "selection" not in data or s.get("diverged_runs", 0) or len(seeds) < MIN_SEEDS:
            continue
        for key, delta in s.items():
            if not key.endswith("equal_time_accuracy_delta_pt") or delta is None:
                continue
            ratio = s.get(key[: -len("equal_time_accuracy_delta_pt")] + "time_ratio")
            if ratio is None or ratio >= 1.0:
                continue
            e = EqualTime(path.stem, key, delta, ratio)
            same = (e.benchmark, e.delta_pt, e.time_ratio)
            if same not in out or len(key) > len(out[same].key):
                out[same] = e  # the prefixed key names the arm
    return sorted(out.values(), key=lambda e: -e.delta_pt)


def _goal(data: Mapping[str, Any]) -> str:
    s = data["summary"]
    for key in ("goal_met", "goal_reached"):
        if isinstance(s.get(key), bool):
            return "yes" if s[key] else "no"
    return "no" if s.get("sets_above_0", 1) == 0 else "see below"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def write(results_dir: pathlib.Path = RESULTS, out: pathlib.Path | None = None) -> pathlib.Path:
    """Writes the page atomically; returns its path."""
    return harness.write_text(out or results_dir / OUT_NAME, build(results_dir))


def main(argv: list[str] | None = None) -> pathlib.Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    return write(pathlib.Path(args.results_dir))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
