"""Growing networks (VT + LRA) against fixed full width, with ablations, on 2 CPU cores.

Plan A: the CNN with batch norm (final widths 16/32/64) on the MNIST subset; plan B: the MLP
40-256-256-10 without batch norm on mnist1d. Both grow from a quarter of the width in 4 steps
(``p_c = 0.5``). Arms, interleaved by seed, on the same batches: fixed full width, grown full
method (VT + LRA), grown without VT, grown without LRA, plain growth (neither), and the full
method with the momentum carried over at growth instead of reset (as GradMax does)::

    python -m benchmarks.growing            # full: 5 seeds, writes benchmarks/results/growing.*
    python -m benchmarks.growing --quick    # smoke: 1 seed, digits + a slice of mnist1d
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optax

from benchmarks import harness
from optax_multirate.data import Split, load_dataset
from optax_multirate.growing import GrowthSchedule, fit_grown, growth_lr_adaptation
from optax_multirate.models import CNN, MLP

logger = logging.getLogger(__name__)

NAME = "growing"
BATCH_SIZE = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
FULL_SEEDS = 5
TOLERANCE_PT = 0.5  # time to (fixed model's final accuracy - 0.5 pt)
ARMS = {  # name: (grown, LRA, rescale, momentum at growth)
    "fixed": (False, False, None, "reset"),
    "grown_full": (True, True, "fan_in", "reset"),
    "grown_no_vt": (True, True, None, "reset"),
    "grown_no_lra": (True, False, "fan_in", "reset"),
    "grown_plain": (True, False, None, "reset"),
    "grown_carry": (True, True, "fan_in", "carry"),  # full method, momentum carried
}

CLAIM = (
    "Yuan, Savarese & Maire (NeurIPS 2023): growing width from 1/4 with variance transfer (VT) "
    "and learning-rate adaptation (LRA) reaches accuracy comparable to the fixed full-width "
    "model while saving a substantial share of the compute and wall-clock (read in secondary "
    "sources: ResNet-20/CIFAR-10 full method 92.53 ± 0.11 vs fixed 92.62 ± 0.15; ablation "
    "plain growth 91.62, + VT 92.00, + LRA 92.24; about 0.83 of the fixed wall-clock, 1.2x "
    "speed-up on ResNet-18/CIFAR-100). The paper's body was not readable; the secondary "
    "sources are the `growingnet` survey wiki and the GroMo re-implementation. Our goal: "
    "time_to_accuracy_ratio <= 0.75 with accuracy_delta_pt >= -0.5."
)


def _downsample(split: Split, factor: int) -> Split:
    """Average-pools ``(N, H, W, C)`` images by ``factor`` (1: unchanged)."""
    if factor == 1:
        return split
    n, h, w, c = split.x.shape
    x = split.x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return Split(x=x.astype(np.float32), y=split.y)


def _tx(total_steps: int, num_stages: int, lra: bool) -> optax.GradientTransformation:
    """SGD + momentum + weight decay + one cosine over all steps; LRA after the momentum."""
    parts = [
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.trace(MOMENTUM),
        optax.scale_by_schedule(optax.cosine_decay_schedule(LR, total_steps)),
    ]
    if lra:
        parts.append(growth_lr_adaptation(num_stages))
    return optax.chain(*parts, optax.scale(-1.0))


def _plan(
    label: str,
    model_fn: Callable[[tuple[int, ...]], Any],
    final: tuple[int, ...],
    train: Split,
    test: Split,
    schedule: GrowthSchedule,
    seeds: list[int],
) -> list[dict[str, Any]]:
    """Runs every arm of one plan on every seed (seed-major) and returns the runs."""
    fixed = GrowthSchedule(final, total_epochs=schedule.total_epochs, m0=1.0)
    total_steps = schedule.total_epochs * (len(train) // BATCH_SIZE)
    # one optimizer object per LRA setting and one step cache, so arms that run the same
    # program (the same stage model under the same optimizer) compile it once
    txs = {lra: _tx(total_steps, schedule.num_stages, lra) for lra in (False, True)}
    cache: dict = {}

    def make(arm: str) -> Callable[[int], dict[str, Any]]:
        grown, lra, rescale, momentum = ARMS[arm]

        def run(seed: int) -> dict[str, Any]:
            res = fit_grown(
                model_fn, txs[lra], train, test, schedule if grown else fixed,
                batch_size=BATCH_SIZE, seed=seed, step_cache=cache,
                grow_kwargs={"rescale": rescale, "momentum": momentum},
                measure_flops=seed == seeds[0],
            )  # fmt: skip
            return {
                "plan": label,
                "final_accuracy": res.final_accuracy,
                "train_time_s": res.train_time_s,
                "compile_time_s": res.compile_time_s,
                "flops": res.flops if res.flops_per_step else None,
                "flops_per_step": res.flops_per_step,
                "steps_per_stage": res.steps_per_stage,
                "step_time_ms_per_stage": [harness.median_ms(t) for t in res.step_times_ms],
                "growths": res.growths,
                "history": res.history,
            }

        return run

    return harness.interleave({f"{label}:{arm}": make(arm) for arm in ARMS}, seeds)


def _summarise(runs: list[dict[str, Any]], label: str, schedule: GrowthSchedule) -> dict:
    """The summary figures of one plan (keys without prefix)."""
    by = {arm: [r for r in runs if r["arm"] == f"{label}:{arm}"] for arm in ARMS}
    acc = {arm: [r["final_accuracy"] for r in rs] for arm, rs in by.items()}
    fixed_mean = float(np.mean(acc["fixed"]))
    target = fixed_mean - TOLERANCE_PT / 100
    tta = {
        arm: [harness.time_to_accuracy(r["history"], target) for r in rs] for arm, rs in by.items()
    }
    pairs = [(f, g) for f, g in zip(tta["fixed"], tta["grown_full"]) if f and g]
    time_ratio = float(np.mean([r["train_time_s"] for r in by["grown_full"]])) / float(
        np.mean([r["train_time_s"] for r in by["fixed"]])
    )
    flops = {arm: rs[0]["flops"] for arm, rs in by.items()}

    def step_cost(arm: str) -> float:  # steps x median step time, per stage (seed medians)
        med = np.median([r["step_time_ms_per_stage"] for r in by[arm]], axis=0)
        return float(np.dot(by[arm][0]["steps_per_stage"], med))

    changes = [g["max_logit_change"] for arm in ARMS if arm != "fixed" for r in by[arm]
               for g in r["growths"]]  # fmt: skip
    rel = [g["max_logit_change"] / max(g["max_logit"], 1e-12) for arm in ARMS if arm != "fixed"
           for r in by[arm] for g in r["growths"]]  # fmt: skip

    def delta(a: str, b: str) -> tuple[float, float, float]:
        m, lo, hi = harness.paired_ci(acc[b], acc[a])
        return 100 * m, 100 * lo, 100 * hi

    out = {
        "fixed_accuracy": fixed_mean,
        "fixed_accuracy_std": harness.mean_std(acc["fixed"])[1],
        "grown_accuracy": float(np.mean(acc["grown_full"])),
        "grown_accuracy_std": harness.mean_std(acc["grown_full"])[1],
        "time_ratio": time_ratio,
        "time_to_accuracy_ratio": (
            float(np.mean([g for _, g in pairs]) / np.mean([f for f, _ in pairs]))
            if pairs
            else None
        ),
        "time_ratio_from_step_medians": step_cost("grown_full") / step_cost("fixed"),
        "time_to_accuracy_reached": len(pairs),
        "target_accuracy": target,
        "flop_ratio": flops["grown_full"] / flops["fixed"],
        "flop_ratio_predicted": schedule.predicted_cost_ratio(2.0),
        "max_logit_change": max(changes) if changes else None,
        "max_logit_change_relative": max(rel) if rel else None,
        "fixed_train_time_s": float(np.mean([r["train_time_s"] for r in by["fixed"]])),
        "grown_train_time_s": float(np.mean([r["train_time_s"] for r in by["grown_full"]])),
    }
    for key, (a, b) in {
        "accuracy_delta_pt": ("grown_full", "fixed"),
        "no_vt_accuracy_delta_pt": ("grown_no_vt", "grown_full"),
        "no_lra_accuracy_delta_pt": ("grown_no_lra", "grown_full"),
        "plain_accuracy_delta_pt": ("grown_plain", "grown_full"),
        "carry_accuracy_delta_pt": ("grown_carry", "grown_full"),
    }.items():
        m, lo, hi = delta(a, b)
        out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = m, lo, hi
    return out


PAPER_ABLATION = [  # (variant, our arm, ResNet-20/CIFAR-10, ResNet-18/CIFAR-100), via the wiki
    ("Net2Net growth", None, "91.60 ± 0.21", "76.48 ± 0.20"),
    ("growth (pairing only)", "grown_plain", "91.62 ± 0.12", "76.82 ± 0.17"),
    ("+ VT", "grown_no_lra", "92.00 ± 0.10", "77.27 ± 0.14"),
    ("+ LRA", "grown_no_vt", "92.24 ± 0.11", "77.74 ± 0.16"),
    ("full (VT + LRA)", "grown_full", "92.53 ± 0.11", "78.12 ± 0.15"),
    ("fixed-size full width", "fixed", "92.62 ± 0.15", "78.36 ± 0.12"),
]


def _ablation_table(runs: list[dict[str, Any]], labels: list[tuple[str, str]]) -> str:
    """The paper's ablation (test accuracy %, mean ± std of 3 runs) beside ours (5 seeds)."""
    head = "| variant | paper: ResNet-20, CIFAR-10 | paper: ResNet-18, CIFAR-100 | " + " | ".join(
        f"ours: {title}" for _, title in labels
    )
    rows = [head + " |", "| --- | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |"]
    for variant, arm, c10, c100 in PAPER_ABLATION:
        ours = []
        for label, _ in labels:
            acc = [100 * r["final_accuracy"] for r in runs if r["arm"] == f"{label}:{arm}"]
            m, sd = harness.mean_std(acc) if acc else (None, None)
            ours.append("not run" if m is None else f"{m:.2f} ± {sd:.2f}")
        rows.append(f"| {variant} | {c10} | {c100} | " + " | ".join(ours) + " |")
    return "\n".join(rows)


def _table(runs: list[dict[str, Any]], label: str, s: dict, title: str) -> str:
    def fmt(x: Any, spec: str = ".4f") -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    def ci(key: str) -> str:
        lo, hi = s[f"{key}_ci_low"], s[f"{key}_ci_high"]
        return f"{fmt(s[key], '+.2f')} ({fmt(lo, '+.2f')} .. {fmt(hi, '+.2f')})"

    rows = [
        f"**{title}**",
        "",
        "| arm | test accuracy (mean ± std) | train time (s) | time to target (s) | compile (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    target = s["target_accuracy"]
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == f"{label}:{arm}"]
        m, sd = harness.mean_std([r["final_accuracy"] for r in rs])
        tt = [harness.time_to_accuracy(r["history"], target) for r in rs]
        reached = [t for t in tt if t is not None]
        tt_s = f"{np.mean(reached):.2f} ({len(reached)}/{len(rs)} reached)" if reached else "never"
        rows.append(
            f"| {arm} | {m:.4f} ± {sd:.4f} | {np.mean([r['train_time_s'] for r in rs]):.2f} | "
            f"{tt_s} | {np.mean([r['compile_time_s'] for r in rs]):.2f} |"
        )
    full = next(r for r in runs if r["arm"] == f"{label}:grown_full")
    rows += [
        "",
        f"Grown full vs fixed: accuracy {ci('accuracy_delta_pt')} pt (95% CI); time ratio "
        f"{fmt(s['time_ratio'], '.3f')} (from median step times per stage: "
        f"{fmt(s['time_ratio_from_step_medians'], '.3f')}); time-to-accuracy ratio "
        f"{fmt(s['time_to_accuracy_ratio'], '.3f')} (target {target:.4f} = fixed mean - "
        f"{TOLERANCE_PT} pt, reached by both in {s['time_to_accuracy_reached']} seeds); FLOP "
        f"ratio {fmt(s['flop_ratio'], '.3f')} measured, {fmt(s['flop_ratio_predicted'], '.3f')} "
        "predicted (sum_t T_t m_t^2 / T).  ",
        f"Ablations vs grown full (paired by seed, pt, 95% CI): without VT "
        f"{ci('no_vt_accuracy_delta_pt')}, without LRA {ci('no_lra_accuracy_delta_pt')}, plain "
        f"growth {ci('plain_accuracy_delta_pt')}; momentum carried instead of reset "
        f"{ci('carry_accuracy_delta_pt')}.  ",
        f"Largest change of the logits at a growth (all grown arms, eval mode, 256 test "
        f"examples): {fmt(s['max_logit_change'], '.2e')} "
        f"({fmt(s['max_logit_change_relative'], '.1e')} of the largest logit).  ",
        "Median step time per stage, grown full seed 0 (ms): "
        + ", ".join(fmt(t, ".1f") for t in full["step_time_ms_per_stage"])
        + "; fixed: "
        + fmt(
            next(r for r in runs if r["arm"] == f"{label}:fixed")["step_time_ms_per_stage"][0],
            ".1f",
        )
        + ".",
    ]
    return "\n".join(rows)


def _plot(runs: list[dict[str, Any]], labels: list[tuple[str, str]]) -> Callable[[Any], None]:
    """Accuracy over train time per plan (seed means bold, seeds faint, growths marked) and
    the LRA ratios of plans A and B (grown full, first seed)."""

    def plot(fig: Any) -> None:
        fig.set_size_inches(5.5 * (len(labels) + 1), 4.5)
        colours = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
        for k, (label, title) in enumerate(labels):
            ax = fig.add_subplot(1, len(labels) + 1, k + 1)
            lows = []
            for arm in ARMS:
                rs = [r for r in runs if r["arm"] == f"{label}:{arm}"]
                t = np.asarray([[x["train_time_s"] for x in r["history"]] for r in rs])
                a = np.asarray([[x["test_accuracy"] for x in r["history"]] for r in rs])
                for ti, ai in zip(t, a):
                    ax.plot(ti, ai, color=colours[arm], alpha=0.15, lw=0.8)
                ax.plot(t.mean(0), a.mean(0), color=colours[arm], lw=2, label=arm)
                lows.append(a.mean(0)[min(2, a.shape[1] - 1)])
                for g in rs[0]["growths"]:  # mean time and accuracy at each growth
                    e = g["epoch"] - 1
                    ax.plot(t[:, e].mean(), a[:, e].mean(), "v", ms=7, color=colours[arm])
            ax.set_xlabel("train time (s; compile and eval excluded, growth included)")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{title}\n(bold: mean of seeds; v: growth)", fontsize=9)
            ax.set_ylim(bottom=min(lows) - 0.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        ax = fig.add_subplot(1, len(labels) + 1, len(labels) + 1)
        for (label, _), style in zip(labels, ("-", "--")):
            r = next(r for r in runs if r["arm"] == f"{label}:grown_full")
            ratios = np.asarray([x["lra_ratios"] for x in r["history"]])
            for t in range(1, ratios.shape[1]):
                ax.plot([x["epoch"] for x in r["history"]], ratios[:, t], style, marker="o",
                        ms=3, color=f"C{t}", label=f"{label}: r_{t}")  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel("r_t = N_t / N_0 at the end of the epoch")
        ax.set_title("LRA ratios, grown full, first seed", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)

    return plot


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs plans A and B and writes ``benchmarks/results/growing.*``.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """

    def flags(p):
        p.add_argument("--mlp-epochs", type=int, default=None, help="epochs of plan B")
        p.add_argument(
            "--resolution", type=int, default=14, choices=(14, 28),
            help="plan A image side: 14 (2x2 average-pooled, the default, to fit ~8 min) or 28",
        )  # fmt: skip

    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=FULL_SEEDS, add_flags=flags)
    if args.quick:
        digits, m1d = load_dataset("digits"), load_dataset("mnist1d")
        epochs_a, epochs_b = args.epochs or 3, args.mlp_epochs or 3
        a_final, b_final = (8,), (32,)
        a_data = (digits.train, digits.test)
        b_data = (Split(m1d.train.x[:1024], m1d.train.y[:1024]), m1d.test)
        sched_kw = dict(m0=0.5, p_c=1.0, t0=1)
        a_model = lambda w: CNN(features=w, pool_after=(), batch_norm=True)
    else:
        mnist, m1d = load_dataset("mnist_subset"), load_dataset("mnist1d")
        epochs_a, epochs_b = args.epochs or 16, args.mlp_epochs or 16
        a_final, b_final = (16, 32, 64), (256, 256)
        a_data = tuple(_downsample(s, 28 // args.resolution) for s in (mnist.train, mnist.test))
        b_data = (m1d.train, m1d.test)
        sched_kw = dict(m0=0.25, p_c=0.5, t0=1)
        a_model = lambda w: CNN(features=w, pool_after=(0, 1), batch_norm=True)
    p_t_a = 0.0 if epochs_a < 16 else 0.5  # 16 epochs: (1, 2, 3, 5, 5); fewer: 1 per stage
    sched_a = GrowthSchedule(a_final, total_epochs=epochs_a, p_t=p_t_a, **sched_kw)
    sched_b = GrowthSchedule(b_final, total_epochs=epochs_b, p_t=0.5, **sched_kw)
    b_model = lambda w: MLP(features=w, num_classes=10)
    runs = _plan("A", a_model, a_final, *a_data, sched_a, seeds)
    runs += _plan("B", b_model, b_final, *b_data, sched_b, seeds)
    sa, sb = _summarise(runs, "A", sched_a), _summarise(runs, "B", sched_b)
    summary = {**sa, **{f"mlp_{k}": v for k, v in sb.items()}}
    title_a = f"A: CNN{a_final} + BN, " + (
        "digits" if args.quick else f"MNIST subset {args.resolution}x{args.resolution}"
    )
    title_b = f"B: MLP{b_final}, no BN, mnist1d"
    config = {
        "plan_a": {
            "model": f"CNN(features={a_final}, batch_norm=True), global average pooling, head",
            "dataset": "digits (quick)"
            if args.quick
            else f"mnist_subset (4,000 / 1,000), {args.resolution}x{args.resolution}",
            "resolution": None if args.quick else args.resolution,
            "widths": sched_a.widths,
            "stage_epochs": sched_a.epochs,
        },
        "plan_b": {
            "model": f"MLP(features={b_final}), no batch norm",
            "dataset": "mnist1d" + (" (first 1,024 train, quick)" if args.quick else ""),
            "widths": sched_b.widths,
            "stage_epochs": sched_b.epochs,
        },
        "optimizer": f"add_decayed_weights({WEIGHT_DECAY}), trace({MOMENTUM}), cosine({LR}) over "
        "all steps, [growth_lr_adaptation(S)], scale(-1)",
        "grow": "pairing, exact=True, momentum='reset', new entries lecun normal at new fan-in",
        "arms": {
            k: {"grown": g, "lra": lra, "rescale": r, "momentum": mo}
            for k, (g, lra, r, mo) in ARMS.items()
        },
        "batch_size": BATCH_SIZE,
        "seeds": seeds,
    }
    shrink = []
    if not args.quick and args.resolution < 28:
        shrink.append(
            f"the images are average-pooled 2x2 to {args.resolution}x{args.resolution} (4x fewer "
            "conv FLOPs; `--resolution 28` for the full-size images)"
        )
    if not args.quick and epochs_a < 16:
        shrink.append(
            f"{epochs_a} epochs with one epoch per growing stage, stage epochs {sched_a.epochs} "
            "(full plan: 16 epochs, (1, 2, 3, 5, 5))"
        )
    shrink_md = (
        "\n\nPlan A is shrunk to fit about 8 minutes on 2 shared cores: " + "; ".join(shrink) + "."
        if shrink
        else ""
    )
    table = (
        "Test accuracy (%), the paper's ablation (as the survey wiki reports it) beside ours:"
        + "\n\n"
        + _ablation_table(runs, [("A", title_a), ("B", title_b)])
        + "\n\n"
        + _table(runs, "A", sa, title_a)
        + "\n\n"
        + _table(runs, "B", sb, title_b)
        + shrink_md
        + "\n\nTrain time excludes compilation and evaluation and includes the growth operations."
    )
    harness.write_results(
        NAME,
        args=args,
        config=config,
        runs=runs,
        summary=summary,
        claim_md=CLAIM,
        table_md=table,
        plot=_plot(runs, [("A", title_a), ("B", title_b)]),
        argv=argv,
    )
    logger.info("summary: %s", summary)
    return summary


if __name__ == "__main__":
    main()
