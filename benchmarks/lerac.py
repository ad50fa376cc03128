"""LeRaC against SGD in the paper's regime: a short curriculum on three small sets.

The paper's regime: the curriculum covers the first part of training only (here 5 ticks of
the authors' staircase, 1.25 epochs, under 10% of every budget), on a constant base rate;
the usual schedule (cosine decay to 0) follows it. Every arm uses that base schedule: SGD
with momentum 0.9 and coupled weight decay 5e-4, its rate held for the curriculum's steps,
then cosine-decayed over the rest.

Sets and models (declared, with their sizes, in the results' ``config``): ``mnist1d_`` a 1-D
CNN with 7 depth units (5 convolutions, a dense layer, the head) on mnist1d's 4,000 training
examples; ``mnist_`` a 2-D CNN with 7 depth units on 1,000 training examples of the MNIST
subset; ``digits_`` an MLP with 7 depth units (6 hidden layers, the head) on 500 training
examples of digits. The smaller sets keep the two easy tasks off their ceiling.

Arms, through the comparison protocol (:mod:`benchmarks.protocol`), per set:

* ``sgd``: its base rate selected on validation from N values;
* ``lerac``: the paper's protocol, inheriting ``sgd``'s rate, with the authors' curriculum
  (staircase, ``c = 10``, ``decay = 0.1``, ``min_scale = 1e-5``, ``head_scale = 1e-3``, 4
  ticks per epoch);
* ``lerac_selected``: base rate and curriculum strength selected jointly within the same N.

Selection scores final-epoch validation accuracy over two seeds; the MLP's selection runs go
through the batched runner, the CNNs' one at a time through ``fit`` (a ``vmap`` over
convolution kernels is far slower than one run after another on CPU). The final runs, 10
paired seeds, go through ``fit``; the test split is read there only. The step-time ratio is
timed on the MNIST CNN, the two train steps called in rounds in a random order.

Run: ``python -m benchmarks.lerac`` (full) or ``--quick`` (seconds: the code path only).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _sets, harness, protocol
from benchmarks.step_cost import _time_rounds
from optax_multirate.data import num_batches
from optax_multirate.lerac import lerac, lerac_depth_labels, lerac_schedules
from optax_multirate.models import MLP
from optax_multirate.train import init_model

logger = logging.getLogger(__name__)

NAME = "lerac"
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
TICKS_PER_EPOCH = 4  # the authors' code offers 1, 2 or 4
# The authors' curriculum: their code's staircase, x c per tick, capped at the base rate.
AUTHORS = {"min_scale": 1e-5, "head_scale": 1e-3}
MODE, C, DECAY = "staircase", 10.0, 0.1
CURRICULUM_TICKS = 5  # ceil(log10(1 / min_scale)): the base rate is held this many ticks
# Selection grids, most conservative first; N = 6 configurations for each selected arm.
SGD_RATES = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
# lerac_selected: 3 base rates x 2 curricula (a mild one, all rates >= 1e-2; the authors')
LERAC_RATES = (0.02, 0.05, 0.1)
CURRICULA = ({"min_scale": 1e-2, "head_scale": 1e-2}, AUTHORS)
TIMING_ROUNDS = 400
GOAL_SETS, GOAL_STEP_TIME_RATIO = 2, 1.02


@dataclasses.dataclass(frozen=True)
class SetSpec:
    """One set's declared setup: model, training examples, batch size, epochs."""

    name: str
    model: nn.Module
    train_examples: int | None  # after the validation split; None: all
    batch_size: int
    epochs: int
    quick_model: nn.Module  # --quick: a shallow model that learns in a few steps


SETS = (
    SetSpec("mnist1d", _sets.ConvNet((16, 16, 32, 32, 32), kernel=5, pool_after=(1, 3)),
            None, 50, 20, _sets.ConvNet((8,), pool_after=(0,), dense=(32,))),
    SetSpec("mnist_subset", _sets.ConvNet((8, 8, 16, 16, 32), kernel=3, pool_after=(0, 1, 3)),
            1000, 50, 20, _sets.ConvNet((4,), pool_after=(0,), dense=(32,))),
    SetSpec("digits", MLP(features=(64,) * 6), 500, 25, 30, MLP(features=(32,))),
)  # fmt: skip
TIMED_SET = "mnist_subset"
# --quick: the MNIST CNN (selection one run at a time, the timing) and the MLP (the batched
# runner); mnist1d's only difference, its 1-D model, is checked by the tests.
QUICK = {"sets": ("mnist_subset", "digits"), "examples": 400, "epochs": 3,
         "learning_rate": 0.1, "rounds": 5}  # fmt: skip

CLAIM = (
    "Croitoru et al., *Learning Rate Curriculum* (IJCV 2024): on 12 data sets and 8 "
    "architectures LeRaC beats conventional training everywhere, at no extra training time; "
    "their runs are long (ResNet-18 on CIFAR-10: the curriculum over the first 5 of 200 "
    "epochs). Our goal, in that regime (a curriculum under 10% of the budget, on a constant "
    f"base rate): the paired 95% interval of LeRaC - SGD above 0 on at least {GOAL_SETS} of "
    f"the 3 sets, and a step-time ratio <= {GOAL_STEP_TIME_RATIO}."
)


# ----------------------------------------------------------------------------- optimizers


def base_schedule(learning_rate: Any, total: int, hold: int) -> optax.Schedule:
    """The rate held for ``hold`` steps (the curriculum), then cosine-decayed to 0."""
    return optax.join_schedules(
        [optax.constant_schedule(learning_rate),
         optax.cosine_decay_schedule(learning_rate, total - hold)], [hold])  # fmt: skip


def make_tx(
    learning_rate: Any,
    min_scale: Any = None,
    head_scale: Any = None,
    *,
    total: int,
    hold: int,
    depth: Any,
    steps_per_tick: int,
) -> optax.GradientTransformation:
    """SGD on the base schedule; with ``min_scale``, LeRaC's staircase placed last."""
    base = optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.sgd(base_schedule(learning_rate, total, hold), momentum=MOMENTUM),
    )
    if min_scale is None:
        return base
    return lerac(base, depth, mode=MODE, c=C, decay=DECAY, min_scale=min_scale,
                 head_scale=head_scale, steps_per_tick=steps_per_tick)  # fmt: skip


def _grids(quick: bool) -> dict[str, list[dict[str, float]]]:
    if quick:
        lr = QUICK["learning_rate"]
        return {
            "sgd": [{"learning_rate": lr}],
            "lerac_selected": [{"learning_rate": lr, **AUTHORS}],
        }
    return {
        "sgd": [{"learning_rate": lr} for lr in SGD_RATES],
        "lerac_selected": [{"learning_rate": lr, **c} for lr in LERAC_RATES for c in CURRICULA],
    }


# ------------------------------------------------------------------------------- one set


class _Set:
    """One set's splits, model, depth units and budget, and its runs."""

    def __init__(self, spec: SetSpec, quick: bool):
        self.spec, self.prefix = spec, _sets.PREFIX[spec.name]
        self.model = spec.quick_model if quick else spec.model
        data, self.record = _sets.load(
            spec.name,
            train_examples=spec.train_examples,
            quick_examples=QUICK["examples"] if quick else None,
        )
        self.num_classes = data.num_classes
        self.splits = protocol.three_splits(data)
        self.epochs = QUICK["epochs"] if quick else spec.epochs
        self.spe = num_batches(self.splits.train, spec.batch_size)
        self.tick = max(1, self.spe // TICKS_PER_EPOCH)
        self.total = self.spe * self.epochs
        self.hold = min(CURRICULUM_TICKS * self.tick, self.total - 1)
        x1 = self.splits.train.x[:1]
        params, _ = jax.eval_shape(lambda: init_model(self.model, jax.random.PRNGKey(0), x1))
        self.depth = lerac_depth_labels(self.model, {"params": params}, x1, train=False)
        self.depths = 1 + max(jax.tree.leaves(self.depth))
        self.make = functools.partial(make_tx, total=self.total, hold=self.hold,
                                      depth=self.depth, steps_per_tick=self.tick)  # fmt: skip
        self.trainer = _sets.Trainer(self.model, self.splits.train,
                                     batch_size=spec.batch_size, epochs=self.epochs)  # fmt: skip
        self.batched = isinstance(self.model, MLP)

    def arm(self, name: str) -> str:
        return self.prefix + name

    def _run(self, config: Mapping[str, Any], seed: int, test: Any = None):
        key = json.dumps(config, sort_keys=True)
        make = lambda: self.make(**config)  # noqa: E731
        if test is None:
            return self.trainer.outcome(key, make, seed, self.splits.validation)
        return {"dataset": self.spec.name, **self.trainer.final(key, make, seed, test)}

    def select(self, grids: Mapping[str, list], seeds: Sequence[int]) -> dict[str, dict]:
        """The selection records of ``sgd``, ``lerac_selected`` and the inheriting ``lerac``."""
        out = {}
        for arm, grid in grids.items():
            out[self.arm(arm)] = _sets.select(
                self.arm(arm), grid, lambda **c: self.make(**c), self.trainer,
                self.splits.validation, final_seeds=seeds, num_classes=self.num_classes,
                run=None if self.batched else self._run)  # fmt: skip
        out[self.arm("lerac")] = protocol.inherit(out, self.arm("sgd"))
        return out

    def final_arms(self) -> dict[str, Callable]:
        """``{arm: fn(config, seed, test)}``: ``lerac`` adds the authors' curriculum."""
        return {
            self.arm("sgd"): lambda c, s, t: self._run(c, s, t),
            self.arm("lerac"): lambda c, s, t: self._run({**c, **AUTHORS}, s, t),
            self.arm("lerac_selected"): lambda c, s, t: self._run(c, s, t),
        }

    def config(self) -> dict[str, Any]:
        return {
            **self.record,
            "model": {
                "class": type(self.model).__name__,
                **{
                    f.name: getattr(self.model, f.name)
                    for f in dataclasses.fields(self.model)
                    if f.name not in ("parent", "name")
                },
            },  # fmt: skip
            "depth_units": self.depths,
            "splits": self.splits.record,
            "batch_size": self.spec.batch_size,
            "epochs": self.epochs,
            "steps_per_epoch": self.spe,
            "steps_per_tick": self.tick,
            "total_steps": self.total,
            "curriculum_steps": self.hold,
            "curriculum_fraction": self.hold / self.total,
            "selection_runner": "run_batched" if self.batched else "fit, one run at a time",
        }


def time_steps(s: _Set, selection: Mapping[str, Any], rounds: int) -> dict[str, Any]:
    """Interleaved timing of the ``sgd`` and ``lerac`` train steps (their final programs).

    Each round calls both once, in a random order, on the same batch and state; the ratio
    is the median of the per-round ratios with its 95% interval (:func:`harness.paired_ratio`).
    """
    chosen = selection[s.arm("sgd")]["chosen"]
    if chosen is None:
        return {}
    configs = {"sgd": chosen, "lerac": {**chosen, **AUTHORS}}
    x, y = s.splits.train.x[: s.spec.batch_size], s.splits.train.y[: s.spec.batch_size]
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    params, model_state = init_model(s.model, jax.random.PRNGKey(0), x[:1])
    fns = {}
    for arm, config in configs.items():
        step = s.trainer.step(json.dumps(config, sort_keys=True))
        fns[arm] = functools.partial(step, params, step.tx.init(params), model_state, batch,
                                     jax.random.PRNGKey(0))  # fmt: skip
    times = _time_rounds(fns, rounds)
    ratio, low, high = harness.paired_ratio(times["lerac"], times["sgd"])
    return {
        "step_time_ratio": ratio,
        "step_time_ratio_ci_low": low,
        "step_time_ratio_ci_high": high,
        "sgd_step_time_ms": harness.median_ms(times["sgd"]),
        "lerac_step_time_ms": harness.median_ms(times["lerac"]),
        "timing_rounds": rounds,
    }


# -------------------------------------------------------------------------------- summary


def summarize(
    sets: Sequence[_Set], runs: Sequence[Mapping[str, Any]], timing: Mapping[str, Any]
) -> dict[str, Any]:
    """Per set: the two deltas with intervals, accuracies, diverged runs; then the goal."""
    s: dict[str, Any] = {}
    for st in sets:
        p, mine = st.prefix, [r for r in runs if r["dataset"] == st.spec.name]
        _sets.put_delta(s, p + "accuracy_delta_pt", mine, st.arm("lerac"), st.arm("sgd"))
        _sets.put_delta(s, p + "selected_accuracy_delta_pt", mine, st.arm("lerac_selected"),
                        st.arm("sgd"))  # fmt: skip
        s[p + "diverged_runs"] = protocol.diverged_runs(mine)
        for arm in ("sgd", "lerac", "lerac_selected"):
            accs = [r["final_accuracy"] for r in mine if r["arm"] == st.arm(arm)]
            mean, std = harness.mean_std(accs) if accs else (None, None)
            s[f"{p}{arm}_accuracy"], s[f"{p}{arm}_accuracy_std"] = mean, std
        s[p + "curriculum_fraction"] = st.hold / st.total
    lows = [s[st.prefix + "accuracy_delta_ci_low_pt"] for st in sets]
    highs = [s[st.prefix + "accuracy_delta_ci_high_pt"] for st in sets]
    s["sets_above_0"] = sum(lo is not None and lo > 0 for lo in lows)
    s["sets_below_0"] = sum(hi is not None and hi < 0 for hi in highs)
    s["diverged_runs"] = protocol.diverged_runs(runs)
    s.update({k: v for k, v in timing.items()})
    s.setdefault("step_time_ratio", None)
    s["goal_reached"] = bool(
        s["sets_above_0"] >= GOAL_SETS
        and s["step_time_ratio"] is not None
        and s["step_time_ratio"] <= GOAL_STEP_TIME_RATIO
    )
    return s


def _f(x: Any, spec: str = "+.2f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)  # None or nan


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


_ci = protocol.delta_text  # mean [low, high]


def table(sets: Sequence[_Set], selection: Mapping[str, Any], s: Mapping[str, Any]) -> str:
    lines = [
        "| set (model, depth units) | train / val / test | epochs (curriculum) | SGD | LeRaC "
        "| LeRaC (selected) | LeRaC - SGD (pt) [95% CI] | selected - SGD (pt) [95% CI] "
        "| diverged |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for st in sets:
        p, r = st.prefix, st.splits.record
        acc = lambda arm, p=p: _pct(s[f"{p}{arm}_accuracy"])  # noqa: E731
        lines.append(
            f"| {st.spec.name} ({type(st.model).__name__}, {st.depths}) | "
            f"{r['train_examples']} / {r['validation_examples']} / {r['test_examples']} | "
            f"{st.epochs} ({100 * st.hold / st.total:.1f}%) | {acc('sgd')} | {acc('lerac')} | "
            f"{acc('lerac_selected')} | {_ci(s, p + 'accuracy_delta_pt')} | "
            f"{_ci(s, p + 'selected_accuracy_delta_pt')} | {s[p + 'diverged_runs']} |"
        )
    lines += [
        "",
        "Selection (final-epoch validation accuracy on the two selection seeds, the score "
        "their mean; `lerac` inherits `sgd`'s rate, the chosen configuration in bold):",
        "",
        protocol.selection_table(selection),
    ]
    lines += [
        "",
        f"Step time on the MNIST CNN ({s.get('timing_rounds', 'n/a')} rounds, both steps once "
        f"per round in a random order): SGD {_f(s.get('sgd_step_time_ms'), '.3f')} ms, LeRaC "
        f"{_f(s.get('lerac_step_time_ms'), '.3f')} ms, **ratio {_f(s['step_time_ratio'], '.3f')}**"
        f" [{_f(s.get('step_time_ratio_ci_low'), '.3f')}, "
        f"{_f(s.get('step_time_ratio_ci_high'), '.3f')}].",
        "",
        f"Goal (LeRaC - SGD interval above 0 on >= {GOAL_SETS} of 3 sets, step-time ratio <= "
        f"{GOAL_STEP_TIME_RATIO}): sets above 0: {s['sets_above_0']} (below 0: "
        f"{s['sets_below_0']}); **{'reached' if s['goal_reached'] else 'not reached'}**. "
        f"Diverged final runs: {s['diverged_runs']}.",
    ]
    return "\n".join(lines)


def per_depth_rates(st: _Set, learning_rate: float, epochs: int = 3):
    """``(steps, base rates, per-depth rates [depth, step])`` of ``lerac`` over the first
    ``epochs`` epochs (:func:`~optax_multirate.lerac.lerac_schedules`, the same rates)."""
    base = base_schedule(learning_rate, st.total, st.hold)
    scheds = lerac_schedules(base, st.depths, mode=MODE, c=C, decay=DECAY,
                             steps_per_tick=st.tick, **AUTHORS)  # fmt: skip
    t = np.arange(min(st.total, epochs * st.spe))
    rates = jax.jit(jax.vmap(lambda u: jnp.stack([base(u), *(f(u) for f in scheds)])))(t)
    rates = np.asarray(rates).T
    return t, rates[0], rates[1:]


def make_plot(sets: Sequence[_Set], selection: Mapping[str, Any], runs: Sequence[Mapping]):
    """Top: each set's per-depth rates over the first 3 epochs (``lerac`` at ``sgd``'s rate);
    bottom: test accuracy against train time per arm."""

    def plot(fig: Any) -> None:
        fig.set_size_inches(15, 8)
        for i, st in enumerate(sets):
            ax = fig.add_subplot(2, len(sets), i + 1)
            chosen = selection[st.arm("sgd")]["chosen"]
            if chosen is not None:
                t, base, rates = per_depth_rates(st, chosen["learning_rate"])
                for j, rate in enumerate(rates):
                    name = "head" if j == st.depths - 1 else f"depth {j}"
                    ax.plot(t / st.spe, rate, color=f"C{j}", label=name, drawstyle="steps-post")
                ax.plot(t / st.spe, base, "k:", label="SGD (all)")
                ax.axvline(st.hold / st.spe, color="0.5", ls="--", lw=0.8)
                ax.set_yscale("log")
                ax.legend(fontsize=6, ncol=2)
            ax.set_xlabel("epoch (dashed: end of the curriculum)")
            ax.set_ylabel("learning rate")
            ax.set_title(f"{st.spec.name}: per-depth rates of lerac")
            ax.grid(alpha=0.3)
            mine = [r for r in runs if r["dataset"] == st.spec.name]
            protocol.plot_accuracy_time(mine, title=st.spec.name)(
                _sets.on_axis(fig.add_subplot(2, len(sets), len(sets) + i + 1))
            )

    return plot


# ----------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the LeRaC benchmark and writes its results.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """
    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=len(protocol.FINAL_SEEDS))
    if args.epochs is not None:
        raise ValueError("--epochs is not supported: each set declares its own epochs")
    t0 = time.perf_counter()
    grids = _grids(args.quick)
    sets = [_Set(spec, args.quick) for spec in SETS if not args.quick or spec.name in QUICK["sets"]]
    selection: dict[str, Any] = {}
    for st in sets:
        selection.update(st.select(grids, seeds))
        logger.info("%s: selection done at %.0f s", st.spec.name, time.perf_counter() - t0)
    n_configs = protocol.check_equal_budgets(selection)
    runs: list[dict[str, Any]] = []
    for st in sets:
        runs += protocol.final_runs(st.final_arms(), selection, st.splits.test,
                                    num_classes=st.num_classes, seeds=seeds)  # fmt: skip
        logger.info("%s: final runs done at %.0f s", st.spec.name, time.perf_counter() - t0)
    timed = next(st for st in sets if st.spec.name == TIMED_SET)
    timing = time_steps(timed, selection, QUICK["rounds"] if args.quick else TIMING_ROUNDS)
    summary = summarize(sets, runs, timing)
    _sets.fill_skipped(summary, [st.spec.name for st in sets])
    summary["configs_per_arm"] = n_configs
    summary["total_time_s"] = time.perf_counter() - t0
    config = {
        "sets": {st.prefix: st.config() for st in sets},
        "base": f"chain(add_decayed_weights({WEIGHT_DECAY}), sgd(schedule, momentum={MOMENTUM}))"
        "; schedule: the rate held for the curriculum's steps, then cosine decay to 0",
        "curriculum": {"mode": MODE, "c": C, "decay": DECAY, **AUTHORS,
                       "ticks_per_epoch": TICKS_PER_EPOCH, "ticks": CURRICULUM_TICKS,
                       "steps_per_tick": "floor(steps per epoch / 4)",
                       "placement": "lerac(base, depth labels, ...): last in the chain"},
        "arms": {"sgd": "base rate selected", "lerac": "inherits sgd's rate; the authors' "
                 "curriculum", "lerac_selected": "base rate and curriculum selected jointly"},
        "grids": grids,
        "configs_per_arm": n_configs,
        "selection_seeds": list(protocol.SELECTION_SEEDS),
        "seeds": seeds,
        "selection_score": "final-epoch validation accuracy, mean over the selection seeds",
        "timed_set": TIMED_SET,
        "divergence_threshold": protocol.divergence_threshold(10),
    }  # fmt: skip
    harness.write_results(NAME, args=args, config=config, runs=runs, summary=summary,
                          claim_md=CLAIM, table_md=table(sets, selection, summary),
                          plot=make_plot(sets, selection, runs), argv=argv,
                          selection=selection)  # fmt: skip
    logger.info("summary: %s", {k: v for k, v in summary.items() if "delta" in k or "ratio" in k})
    return summary


if __name__ == "__main__":
    main()
