"""Pairwise composition: two methods in one optax chain, beside each alone and plain SGD.

Each pair of methods that makes sense together runs as one chain, its phases combined by
the phase protocol (a gradient is computed only if every phased method in the chain reads
it), on the same model, data, batches, seeds and epochs as the references:

* ``multirate+lerac``: ``chain(multirate_sgd(...), scale_by_lerac(...))``: the curriculum
  scales the final step of both parts, the slow part's held update included;
* ``wus+lerac``: ``chain(wus(sgd), scale_by_lerac(...))``: LeRaC after WUS, not inside it
  (inside, WUS would run it as two instances whose counts part ways in a window);
* ``two_regimes+lerac``: ``chain(two_regimes(sgd, adam), scale_by_lerac(...))``;
* ``growing+lerac``: ``chain(sgd, growth_lr_adaptation(S), scale_by_lerac(...))`` over a whole
  grown run (:func:`optax_multirate.fit_grown`), the depth labels a function of the paths so
  that they follow the widths.

References: ``sgd`` and every method alone. A small CNN with batch norm on scikit-learn's
digits, seeds interleaved (seed 0 of every arm, then seed 1), every run through the library's
loop (:func:`optax_multirate.train.fit`; the grown arms through
:func:`optax_multirate.fit_grown`, which is ``fit`` with a growth callback). There is no
selection here: every arm uses the same step size, since no claim is compared. Each run is
caught on its own: a failure is recorded with its error in the results (``pairs_failed``),
never dropped; a run whose loss goes non-finite or whose last epoch's mean training loss is
at or above ``0.9 ln 10`` is flagged as diverged (``diverged_runs``, per arm
``<arm>_diverged_runs``), kept in the means and shown in the table::

    python -m benchmarks.combos            # full: 3 seeds, writes benchmarks/results/combos.*
    python -m benchmarks.combos --quick    # smoke: 1 seed, 2 epochs on 256 examples, pairs only
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

import optax_multirate as om
from benchmarks import harness, protocol
from optax_multirate.data import Split, load_dataset, num_batches
from optax_multirate.models import CNN

logger = logging.getLogger(__name__)

NAME = "combos"
DATASET = "digits"
FEATURES = (16, 32)  # 3x3 convs + batch norm + relu, a 2x2 max-pool after the first
POOL_AFTER = (0,)
BATCH_SIZE = 64
LEARNING_RATE = 0.05
MOMENTUM = 0.9
FULL_EPOCHS = 12
FULL_SEEDS = 3  # accuracy over at least 3 seeds; the run takes minutes
QUICK_EPOCHS = 2
QUICK_EXAMPLES = 256
MULTIRATE_K = 5  # the head is fast, the convolutions (and their norms) slow
LERAC_SCALES = (1.0, 1e-1, 1e-2)  # conv 0, conv 1, head: lower with depth
LERAC_K_EPOCHS = 2  # every depth at the base rate after 2 epochs (1 under --quick)
WUS_KW = {"threshold": 0.005, "window": 2, "warmup": 3}  # wus's defaults, per epoch
SMALL_STEP_LR = 1e-3  # two regimes: Adam after the switch
LARGE_FRACTION = 0.8
GROWTH = {"m0": 0.25, "p_c": 1.0}  # widths x1/4, x1/2, x1: three stages, two growths
QUICK_GROWTH = {"m0": 0.5, "p_c": 1.0}  # --quick: x1/2, x1

REFERENCES = ("sgd",)
ALONE = ("multirate", "lerac", "wus", "two_regimes", "growing")
PAIRS = ("multirate+lerac", "wus+lerac", "two_regimes+lerac", "growing+lerac")

CLAIM = (
    "No paper combines these methods. The claim is the library's: each pair of "
    "methods that makes sense together runs in one optax chain, its phases combined by the "
    "phased train step, with no change to either method; the benchmark reports accuracy and "
    "time per pair beside each method alone and plain SGD. Each method's own paper claim is "
    "tested by its own benchmark, not here."
)


def _key(arm: str) -> str:
    """A summary-key prefix for an arm: ``wus+lerac`` -> ``wus_lerac``."""
    return arm.replace("+", "_")


def _depths(params: Any) -> Any:
    """LeRaC depth units from the paths (conv ``i`` and its norm: ``i``; the head: last).

    A function of the paths only, so it labels every width of a grown run.
    """
    convs = {int(k.rsplit("_", 1)[1]) for k in params if k.startswith("Conv_")}
    head = max(convs) + 1

    def unit(path, _):
        top = path[0].key
        return head if top == "head" else int(top.rsplit("_", 1)[1])

    return jax.tree_util.tree_map_with_path(unit, params)


def _fast_slow(params: Any) -> Any:
    return om.rule_labels(params, {"fast": "^head/"}, default="slow")


def _value(metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {"value": metrics["accuracy"]}


def _sgd() -> optax.GradientTransformation:
    return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


class _Plan:
    """The optimizers of every arm for one data size and epoch budget."""

    def __init__(self, steps_per_epoch: int, epochs: int, lerac_k_epochs: int):
        self.spe = steps_per_epoch
        self.total = steps_per_epoch * epochs
        self.lerac_k = lerac_k_epochs * steps_per_epoch

    def lerac(self) -> optax.GradientTransformation:
        return om.scale_by_lerac(_depths, k=self.lerac_k, initial_scales=LERAC_SCALES)

    def multirate(self) -> optax.GradientTransformation:
        return om.multirate_sgd(LEARNING_RATE, MULTIRATE_K, _fast_slow, momentum=MOMENTUM)

    def wus(self) -> optax.GradientTransformation:
        return om.wus(_sgd(), om.wus_labels, accumulation_size=self.spe, **WUS_KW)

    def two_regimes(self) -> optax.GradientTransformation:
        switch = int(round(LARGE_FRACTION * self.total))
        return om.two_regimes(_sgd(), optax.adam(SMALL_STEP_LR), switch_step=switch)

    def growing(self, num_stages: int) -> optax.GradientTransformation:
        return om.growth_lr_adaptation(num_stages)

    def tx(self, arm: str, num_stages: int) -> tuple[optax.GradientTransformation, str]:
        """The optimizer of ``arm`` and its description (for the config)."""
        chains = {
            "sgd": (lambda: _sgd(), "sgd"),
            "multirate": (self.multirate, "multirate_sgd"),
            "lerac": (lambda: optax.chain(_sgd(), self.lerac()), "chain(sgd, scale_by_lerac)"),
            "wus": (self.wus, "wus(sgd)"),
            "two_regimes": (self.two_regimes, "two_regimes(sgd, adam)"),
            "growing": (
                lambda: optax.chain(_sgd(), self.growing(num_stages)),
                "chain(sgd, growth_lr_adaptation)",
            ),
            "multirate+lerac": (
                lambda: optax.chain(self.multirate(), self.lerac()),
                "chain(multirate_sgd, scale_by_lerac)",
            ),
            "wus+lerac": (
                lambda: optax.chain(self.wus(), self.lerac()),
                "chain(wus(sgd), scale_by_lerac)",
            ),
            "two_regimes+lerac": (
                lambda: optax.chain(self.two_regimes(), self.lerac()),
                "chain(two_regimes(sgd, adam), scale_by_lerac)",
            ),
            "growing+lerac": (
                lambda: optax.chain(_sgd(), self.growing(num_stages), self.lerac()),
                "chain(sgd, growth_lr_adaptation, scale_by_lerac)",
            ),
        }
        make, desc = chains[arm]
        return make(), desc


def _model(widths: Sequence[int], num_classes: int) -> CNN:
    return CNN(
        features=tuple(widths), pool_after=POOL_AFTER, batch_norm=True, num_classes=num_classes
    )


def _run_arm(
    arm: str,
    seed: int,
    *,
    plan: _Plan,
    schedule: om.GrowthSchedule,
    train: Split,
    test: Split,
    epochs: int,
    num_classes: int,
) -> dict[str, Any]:
    """One run of one arm: figures, or the error it raised (never swallowed silently)."""
    try:
        tx, _ = plan.tx(arm, schedule.num_stages)
        if arm.startswith("growing"):
            res = om.fit_grown(
                lambda w: _model(w, num_classes),
                tx,
                train,
                test,
                schedule,
                batch_size=BATCH_SIZE,
                seed=seed,
            )
            partial = 0
            steps = sum(res.steps_per_stage)
            step_ms = harness.median_ms(m for stage in res.step_times_ms for m in stage)
            partial_ms = math.nan
            # No phased method in these chains: every step program is the full gradient.
            masks = ["full"] if not om.find_tags(res.opt_state) else ["unknown (fit_grown)"]
            extra = {"growths": len(res.growths), "num_compiles": sum(res.num_compiles)}
        else:
            model = _model(FEATURES, num_classes)
            extra_args_fn = _value if arm.startswith("wus") else None
            res = om.fit(
                model,
                tx,
                train,
                epochs=epochs,
                batch_size=BATCH_SIZE,
                seed=seed,
                step=om.make_train_step(model, tx, extra_args_fn=extra_args_fn),
                callbacks=[om.Evaluate({"test": test})],
            )
            steps = res.steps
            partial = sum(len(v) for k, v in res.step_times_ms.items() if k != "full")
            step_ms = harness.median_ms(res.step_times_ms.get("full", []))
            partial_ms = harness.median_ms(
                m for k, v in res.step_times_ms.items() if k != "full" for m in v
            )
            masks = sorted(res.masks)
            extra = {"num_compiles": res.num_compiles}
        windows = optax.tree_utils.tree_get(res.opt_state, "windows")
        switched = optax.tree_utils.tree_get(res.opt_state, "switched_at")
        if windows is not None:
            extra["wus_windows"] = int(windows)
            skipped = optax.tree_utils.tree_get(res.opt_state, "skipped_steps")
            extra["wus_skipped_steps"] = int(skipped)
        if switched is not None:
            extra["switched_at"] = int(switched)
        return {
            "failed": False,
            "error": None,
            "diverged": protocol.is_diverged(
                [row["train_loss"] for row in res.history], num_classes
            ),
            "final_accuracy": res.final_accuracy,
            "train_time_s": res.train_time_s,
            "compile_time_s": res.compile_time_s,
            "steps": steps,
            "full_step_time_ms": step_ms,  # median over the timed full-gradient steps
            "partial_step_time_ms": partial_ms,  # and over the partial ones (nan: none)
            "masks": masks,
            # timed steps run with a partial-gradient mask (steps that compiled are not timed)
            "partial_steps": partial,
            "history": res.history,
            **extra,
        }
    except Exception as e:  # noqa: BLE001 - recorded in the results, see the module docstring
        logger.exception("arm %s seed %d failed", arm, seed)
        return {
            "failed": True,
            "diverged": False,  # a failed run is counted in failed_runs, not here
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=-8),
            "final_accuracy": None,
            "train_time_s": None,
            "history": [],
        }


def _summarise(runs: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per-arm figures (means over the seeds that ran) and the pair counts."""
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in arms}
    sgd_time = {r["seed"]: r["train_time_s"] for r in by_arm.get("sgd", []) if not r["failed"]}
    sgd_acc = {r["seed"]: r["final_accuracy"] for r in by_arm.get("sgd", []) if not r["failed"]}
    summary: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        ok = [r for r in rs if not r["failed"]]
        k = _key(arm)
        acc = harness.mean_std([r["final_accuracy"] for r in ok]) if ok else (None, None)
        summary[f"{k}_accuracy"], summary[f"{k}_accuracy_std"] = acc
        summary[f"{k}_train_time_s"] = (
            harness.mean_std([r["train_time_s"] for r in ok])[0] if ok else None
        )
        ratios = [r["train_time_s"] / sgd_time[r["seed"]] for r in ok if r["seed"] in sgd_time]
        summary[f"{k}_time_ratio"] = harness.mean_std(ratios)[0] if ratios else None
        deltas = [
            100.0 * (r["final_accuracy"] - sgd_acc[r["seed"]]) for r in ok if r["seed"] in sgd_acc
        ]
        summary[f"{k}_accuracy_delta_pt"] = harness.mean_std(deltas)[0] if deltas else None
        for kind in ("full", "partial"):
            ms = [r[f"{kind}_step_time_ms"] for r in ok]
            ms = [m for m in ms if m is not None and not math.isnan(m)]
            summary[f"{k}_{kind}_step_time_ms"] = harness.median_ms(ms) if ms else None
        summary[f"{k}_failed_runs"] = len(rs) - len(ok)
        summary[f"{k}_diverged_runs"] = protocol.diverged_runs(rs)
    pairs = [a for a in arms if a in PAIRS]
    summary["pairs_run"] = len(pairs)
    summary["pairs_failed"] = sum(1 for a in pairs if summary[f"{_key(a)}_failed_runs"])
    summary["runs_failed"] = sum(1 for r in runs if r["failed"])
    summary["diverged_runs"] = protocol.diverged_runs(runs)
    return summary


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(
    runs: list[dict[str, Any]],
    arms: Sequence[str],
    summary: Mapping[str, Any],
    descs: Mapping[str, str],
) -> str:
    rows = [
        "| arm | chain | test accuracy | vs SGD (pt) | train time (s) | time ratio vs SGD "
        "| full / partial step (ms) | step programs | partial-gradient steps | notes "
        "| diverged runs | failed runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for arm in arms:
        k = _key(arm)
        rs = [r for r in runs if r["arm"] == arm]
        ok = [r for r in rs if not r["failed"]]
        masks = sorted({m for r in ok for m in r["masks"]})
        partial = sum(r["partial_steps"] for r in ok)
        steps = sum(r["steps"] for r in ok)
        notes = []
        if any("wus_windows" in r for r in ok):
            notes.append("windows " + "/".join(str(r["wus_windows"]) for r in ok))
            notes.append("window steps " + "/".join(str(r["wus_skipped_steps"]) for r in ok))
        if any("switched_at" in r for r in ok):
            notes.append("switch at step " + "/".join(str(r["switched_at"]) for r in ok))
        if any("growths" in r for r in ok):
            notes.append("growths " + "/".join(str(r["growths"]) for r in ok))
        errors = "; ".join(r["error"] for r in rs if r["failed"])
        rows.append(
            f"| {'**' + arm + '**' if arm in PAIRS else arm} | `{descs[arm]}` "
            f"| {_fmt(summary[f'{k}_accuracy'], '.4f')} ± "
            f"{_fmt(summary[f'{k}_accuracy_std'], '.4f')} "
            f"| {_fmt(summary[f'{k}_accuracy_delta_pt'], '+.2f')} "
            f"| {_fmt(summary[f'{k}_train_time_s'], '.2f')} "
            f"| {_fmt(summary[f'{k}_time_ratio'], '.2f')} "
            f"| {_fmt(summary[f'{k}_full_step_time_ms'], '.2f')} / "
            f"{_fmt(summary[f'{k}_partial_step_time_ms'], '.2f')} "
            f"| {', '.join(masks) or 'n/a'} | {partial}/{steps} | {', '.join(notes)} "
            f"| {summary[f'{k}_diverged_runs']} of {len(rs)} "
            f"| {summary[f'{k}_failed_runs']}{' (' + errors + ')' if errors else ''} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs every arm on every seed, interleaved, and writes ``benchmarks/results/combos.*``.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """
    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=FULL_SEEDS)
    epochs = harness.epochs_from_args(args, full=FULL_EPOCHS, quick=QUICK_EPOCHS)
    data = load_dataset(DATASET)
    train = data.train
    if args.quick:
        train = Split(x=train.x[:QUICK_EXAMPLES], y=train.y[:QUICK_EXAMPLES])
    spe = num_batches(train, BATCH_SIZE)
    plan = _Plan(spe, epochs, 1 if args.quick else LERAC_K_EPOCHS)
    # t0 epochs at a quarter width, then 2 t0 at half (p_t = 1), the rest at full width.
    t0, p_t = (1, 0.0) if epochs < 8 else (epochs // 4, 1.0)
    growth = QUICK_GROWTH if args.quick else GROWTH
    schedule = om.GrowthSchedule(FEATURES, total_epochs=epochs, t0=t0, p_t=p_t, **growth)
    arms = (*REFERENCES, *PAIRS) if args.quick else (*REFERENCES, *ALONE, *PAIRS)
    descs = {a: plan.tx(a, schedule.num_stages)[1] for a in arms}
    run = {
        arm: (
            lambda seed, arm=arm: _run_arm(
                arm,
                seed,
                plan=plan,
                schedule=schedule,
                train=train,
                test=data.test,
                epochs=epochs,
                num_classes=data.num_classes,
            )
        )
        for arm in arms
    }
    runs = harness.interleave(run, seeds)
    summary = _summarise(runs, arms)
    if summary["runs_failed"]:
        logger.error(
            "%d runs failed: %s",
            summary["runs_failed"],
            "; ".join(f"{r['arm']} seed {r['seed']}: {r['error']}" for r in runs if r["failed"]),
        )
    config = {
        "model": (
            f"CNN(features={FEATURES}, pool_after={POOL_AFTER}, batch_norm=True): 3x3 convs, "
            "global average pooling, head"
        ),
        "dataset": DATASET + (f" (first {QUICK_EXAMPLES} train)" if args.quick else ""),
        "train_examples": len(train),
        "test_examples": len(data.test),
        "epochs": epochs,
        "steps_per_epoch": spe,
        "batch_size": BATCH_SIZE,
        "seeds": seeds,
        "arms": {a: descs[a] for a in arms},
        "sgd": f"optax.sgd({LEARNING_RATE}, momentum={MOMENTUM})",
        "multirate": f"k={MULTIRATE_K}, fast = head, slow = convolutions and their norms",
        "lerac": f"initial_scales={LERAC_SCALES} (conv 0, conv 1, head), k={plan.lerac_k} steps",
        "wus": {**WUS_KW, "accumulation_size": spe, "value": "minibatch accuracy"},
        "two_regimes": (
            f"sgd until step {int(round(LARGE_FRACTION * plan.total))} "
            f"({LARGE_FRACTION:.0%}), then adam({SMALL_STEP_LR})"
        ),
        "growing": {
            "widths": schedule.widths,
            "epochs": schedule.epochs,
            "lra": "growth_lr_adaptation(num_stages)",
        },
    }
    note = (
        f"\n\n{len(seeds)} seed(s), {epochs} epochs of {spe} steps, batch {BATCH_SIZE}; pairs in "
        "bold. Train time excludes compilation and evaluation (growth included); time ratio is "
        "the per-seed ratio to `sgd`, averaged. Full / partial step: median wall time of a "
        "step with the full gradient and with a partial one (the median of the runs' medians). "
        "On steps this short, fixed per-step costs (dispatch, the phase read) weigh heavily, so "
        "the ratios say whether a combination costs extra more than what a phase saves on a "
        "larger model (see `benchmarks/step_cost.py`). Partial-gradient steps: timed steps run "
        "with a program that differentiates only part of the params (multirate's fast-only "
        "steps, WUS windows). Notes give per seed the WUS windows opened and the steps run in "
        "one (a window opened after the last epoch runs none), the two-regimes switch step and "
        "the growths. Diverged runs: a non-finite loss or a last-epoch mean training loss at "
        f"or above 0.9 ln 10 ({summary['diverged_runs']} in all); they stay in the means."
    )
    harness.write_results(
        NAME,
        args=args,
        config=config,
        runs=runs,
        summary=summary,
        claim_md=CLAIM,
        table_md=_table(runs, arms, summary, descs) + note,
        plot=harness.plot_curves(
            [r for r in runs if not r["failed"]],
            title=f"Pairs in one chain vs each alone, CNN, {DATASET}",
        ),
        argv=argv,
    )
    return summary


if __name__ == "__main__":
    main()
