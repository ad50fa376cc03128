"""Multirate from scratch: random slow subgroups where SGD overfits, and several time scales.

Both parts follow the comparison protocol (:mod:`benchmarks.protocol`): a stratified 15% of
the training data is held out for validation, every arm selects its hyperparameters from its
own grid of N = 6 configurations (most conservative first) by final-epoch validation accuracy
over two selection seeds, and the chosen configuration of each arm trains on ten paired final
seeds through :func:`optax_multirate.train.fit`; only those runs read the test split.

1. **Random subgroups** (``multirate_subgroups``, k = 5; the forward pass of a fast step uses
   ``apply_slow_mask``) against plain SGD, with SGD + dropout as a second reference, on
   MNIST-1D with a one-hidden-layer MLP (256 units), 100 epochs of batch 64: a task where SGD
   overfits (it fits the training data while validation accuracy stays far lower; checked on
   validation with the selection seeds before the final runs, ``overfit_validation_gap_pt``
   >= 5). Grids: SGD's step size; dropout's step size x rate; subgroups' fast step size x
   slow fraction. Deltas are subgroups (or dropout) minus SGD, paired by seed.
2. **Several time scales** (``multirate_timescales`` with multipliers (1, 25): two brains
   averaged every 25 steps) against SGD with momentum, each with its step size selected, on
   8x8 digits with a class-coded 2x2 corner patch (20% of the training images clean, 16%
   patch only, 64% both, after Li, Wei & Ma 2019), tested on clean, patch-only and patched
   images.

The selection runs of SGD, SGD + dropout and both time-scales arms train at once under
``jax.vmap`` (:func:`benchmarks.batched.run_batched`); those of the subgroups arm go through
``fit`` one at a time, since the batched runner has no forward pass that reads the optimizer
state. Run: ``python -m benchmarks.multirate_scratch`` (full) or ``--quick`` (seconds).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from benchmarks import harness, protocol
from benchmarks.batched import run_batched
from optax_multirate.data import Dataset, Split, load_dataset
from optax_multirate.models import MLP
from optax_multirate.multirate import apply_slow_mask, multirate_subgroups, multirate_timescales
from optax_multirate.phases import PhasedStep
from optax_multirate.train import (
    Evaluate,
    LoopState,
    TrainStep,
    classification_loss,
    fit,
    init_model,
    make_train_step,
)

logger = logging.getLogger(__name__)

NAME = "multirate_scratch"
HIDDEN = 256
# Part 1: random subgroups on MNIST-1D, where SGD overfits.
SG_DATASET = "mnist1d"
SG_BATCH_SIZE = 64
SG_EPOCHS = 100
SG_K = 5
SG_GRIDS = {  # N = 6 each, most conservative (smallest step) first
    "sgd": [{"learning_rate": lr} for lr in (0.1, 0.3, 0.5, 1.0, 2.0, 4.0)],
    "sgd_dropout": [
        {"learning_rate": lr, "dropout": d} for lr in (0.5, 1.0, 2.0) for d in (0.1, 0.25)
    ],
    "subgroups": [
        {"learning_rate": lr, "slow_fraction": q} for lr in (0.5, 1.0, 2.0) for q in (0.05, 0.1)
    ],
}
OVERFIT_GAP_PT = 5.0  # SGD's train minus validation accuracy that makes the task one of overfitting
# Part 2: several time scales on patch-augmented digits.
TS_DATASET = "digits"
TS_BATCH_SIZE = 32
TS_EPOCHS = 50  # 50 epochs x 38 steps = 1,900 steps: the last evaluation falls on a merge
TS_RATIO = 25
TS_MOMENTUM = 0.9
TS_WEIGHT_DECAY = 5e-4
TS_GRIDS = {
    "ts_sgd": [{"learning_rate": lr} for lr in (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)],
    "timescales": [{"learning_rate": h} for h in (0.004, 0.008, 0.016, 0.032, 0.064, 0.128)],
}
PATCH_SHARES = (0.2, 0.16, 0.64)  # clean, patch only, both
PATCH_NOISE = 0.05
TEST_SETS = ("test", "patch", "both")  # clean, patch only, image + patch
# --quick: two configurations per arm, two epochs, one seed (both data sets are small).
QUICK_EPOCHS = 2
QUICK_GRIDS = {
    "sgd": [{"learning_rate": lr} for lr in (0.5, 1.0)],
    "sgd_dropout": [{"learning_rate": lr, "dropout": 0.1} for lr in (0.5, 1.0)],
    "subgroups": [{"learning_rate": lr, "slow_fraction": 0.1} for lr in (0.5, 1.0)],
    "ts_sgd": [{"learning_rate": lr} for lr in (0.05, 0.1)],
    "timescales": [{"learning_rate": h} for h in (0.004, 0.008)],
}

CLAIM = (
    "Vlaar & Leimkuhler (ICML 2022; NUMDIFF-16 slides). *Random subgroups*: a small "
    "Transformer on Penn Treebank reaches a minimum validation loss of about 4.84 with "
    "multirate, 4.86 with SGD (rising to 4.96 by epoch 150) and 4.92 with SGD + dropout "
    "(still falling), i.e. a regularizing effect of about 0.02-0.07 in loss (read from the "
    "poster's plot; fraction and k not stated): better generalisation than SGD. *Several time "
    "scales*: WRN-16 on patch-augmented CIFAR-10 at epoch 50, h = 0.004 / h = 0.1 / multirate: "
    "clean accuracy 69.3 / 71.7 / 76.5%, patch-only 98.9 / 26.6 / 97.2%: multirate memorises "
    "the patch and keeps the best clean accuracy."
)

Run = dict[str, Any]

# ------------------------------------------------------------------------------ the models


def _mlp(config: Mapping[str, Any], num_classes: int) -> MLP:
    return MLP((HIDDEN,), num_classes=num_classes, dropout=config.get("dropout", 0.0))


def _sgd(learning_rate: Any) -> optax.GradientTransformation:
    return optax.sgd(learning_rate)


def _subgroups(learning_rate: Any, slow_fraction: float, seed: int = 0):
    return multirate_subgroups(learning_rate, SG_K, slow_fraction, seed=seed)


def _ts_sgd(learning_rate: Any) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(TS_WEIGHT_DECAY), optax.sgd(learning_rate, TS_MOMENTUM)
    )


def _timescales(learning_rate: Any) -> optax.GradientTransformation:
    return multirate_timescales(learning_rate, (1, TS_RATIO), TS_MOMENTUM, TS_WEIGHT_DECAY)


class _SlowMaskStep(TrainStep):
    """The library's train step with the forward pass at ``apply_slow_mask(params, opt_state)``.

    ``multirate_subgroups`` differentiates the loss at the params with the slow entries
    switched off on fast steps; the optimizer state that says which entries those are goes to
    the loss as an argument. Everything else (timing, metrics, evaluation) is ``fit``'s.
    """

    def __init__(self, model: nn.Module, tx: optax.GradientTransformation):
        super().__init__(model, tx, dispatch="full")
        loss = classification_loss(model)

        def masked(params, opt_state, model_state, batch, rng):
            return loss(apply_slow_mask(params, opt_state), model_state, batch, rng)

        self.phased = PhasedStep(masked, tx, has_aux=True, dispatch="full")

    def __call__(self, params, opt_state, model_state, batch, rng, **extra):
        out = self.phased(params, opt_state, opt_state, model_state, self.shard(batch), rng,
                          **extra)  # fmt: skip
        model_state, metrics = out.aux
        return out.params, out.opt_state, model_state, metrics


# --------------------------------------------------------------------------------- selection


def _batched(
    arm: str,
    grid: Sequence[Mapping[str, Any]],
    model_of: Callable[[Mapping[str, Any]], nn.Module],
    make_tx: Callable[..., optax.GradientTransformation],
    splits: protocol.Splits,
    *,
    seeds: Sequence[int],
    num_classes: int,
    batch_size: int,
    epochs: int,
) -> dict[str, Any]:
    """``arm``'s selection record, its runs vmapped (one :func:`run_batched` per model)."""
    outcomes: dict[tuple[str, int], protocol.RunOutcome] = {}
    by_model: dict[str, tuple[nn.Module, list[dict[str, Any]]]] = {}
    for config in grid:
        model = model_of(config)
        by_model.setdefault(repr(model), (model, []))[1].append(dict(config))
    for model, configs in by_model.values():
        tx_grid = [{"learning_rate": c["learning_rate"]} for c in configs]
        res = run_batched(model, make_tx, tx_grid, protocol.SELECTION_SEEDS, splits.train,
                          splits.validation, batch_size=batch_size, epochs=epochs)  # fmt: skip
        for config, tx_config in zip(configs, tx_grid):
            for seed in protocol.SELECTION_SEEDS:
                outcomes[repr(config), seed] = res.outcome(tx_config, seed)
    return protocol.select(arm, grid, lambda c, s: outcomes[repr(c), s], final_seeds=seeds,
                           num_classes=num_classes, budget=len(grid))  # fmt: skip


# -------------------------------------------------------------------------------- final runs


def _subgroups_part(data: Dataset, grids: Mapping[str, list], seeds: list[int], *,
                    epochs: int) -> tuple[dict, list[Run], dict, dict]:  # fmt: skip
    """Random subgroups vs SGD and SGD + dropout: selection records, runs, checks, splits."""
    splits = protocol.three_splits(data)
    n, bs = data.num_classes, SG_BATCH_SIZE
    kw = dict(seeds=seeds, num_classes=n, batch_size=bs, epochs=epochs)
    selection = {
        "sgd": _batched("sgd", grids["sgd"], lambda c: _mlp(c, n), _sgd, splits, **kw),
        "sgd_dropout": _batched(
            "sgd_dropout", grids["sgd_dropout"], lambda c: _mlp(c, n), _sgd, splits, **kw
        ),
    }
    compiled: dict[str, tuple[optax.GradientTransformation, TrainStep]] = {}

    def subgroups_fit(config: Mapping[str, Any], seed: int, evals: Mapping[str, Any]):
        lr, q = config["learning_rate"], config["slow_fraction"]
        key = repr(sorted(config.items()))
        if key not in compiled:  # one compiled step per configuration, shared by its runs
            tx = _subgroups(lr, q)
            compiled[key] = (tx, _SlowMaskStep(_mlp(config, n), tx))
        tx, step = compiled[key]
        # fit's own init (params from PRNGKey(seed)), the masks drawn from the run's seed:
        # the seed enters the optimizer's init only, so the step is the same for every seed
        params, model_state = init_model(step.model, jax.random.PRNGKey(seed), splits.train.x[:1])
        init = LoopState(params, model_state, _subgroups(lr, q, seed=seed).init(params))
        return fit(step.model, tx, splits.train, epochs=epochs, batch_size=bs, seed=seed,
                   init=init, step=step, callbacks=[Evaluate(evals)])  # fmt: skip

    def select_subgroups(config: dict[str, Any], seed: int) -> dict[str, Any]:
        res = subgroups_fit(config, seed, {"val": splits.validation})
        return {
            "val_accuracy": res.history[-1]["val_accuracy"],
            "train_loss": [row["train_loss"] for row in res.history],
        }

    selection["subgroups"] = protocol.select("subgroups", grids["subgroups"], select_subgroups,
                                             final_seeds=seeds, num_classes=n,
                                             budget=len(grids["subgroups"]))  # fmt: skip

    def plain_fit(config: Mapping[str, Any], seed: int, evals: Mapping[str, Any]):
        key = repr(sorted(config.items()))
        if key not in compiled:  # one compiled step per configuration, shared by its runs
            model, tx = _mlp(config, n), _sgd(config["learning_rate"])
            compiled[key] = (tx, make_train_step(model, tx))
        tx, step = compiled[key]
        return fit(step.model, tx, splits.train, epochs=epochs, batch_size=bs, seed=seed,
                   step=step, callbacks=[Evaluate(evals)])  # fmt: skip

    check = _overfit_check(selection["sgd"], plain_fit, splits)

    def evals(test: Split) -> dict[str, Any]:
        return {"test": test, "train_eval": splits.train}

    def final_plain(config: dict[str, Any], seed: int, test: Split) -> Run:
        return _final_row(plain_fit(config, seed, evals(test)))

    def final_subgroups(config: dict[str, Any], seed: int, test: Split) -> Run:
        return _final_row(subgroups_fit(config, seed, evals(test)))

    runs = protocol.final_runs(
        {"sgd": final_plain, "sgd_dropout": final_plain, "subgroups": final_subgroups},
        selection,
        splits.test,
        num_classes=n,
        seeds=seeds,
    )
    for r in runs:
        r["part"] = "subgroups"
    return selection, runs, check, splits.record


def _overfit_check(
    record: Mapping[str, Any], run: Callable[..., Any], splits: protocol.Splits
) -> dict[str, Any]:
    """SGD's chosen step size on the selection seeds: train minus validation accuracy (pt).

    ``run(config, seed, evals)`` trains through ``fit`` (the selection runs again, now with
    the training split evaluated too, in eval mode), before any final run.
    """
    if record["chosen"] is None:
        return {"overfit_validation_gap_pt": None, "overfit_condition_met": False}
    evals = {"val": splits.validation, "train_eval": splits.train}
    rows = [run(record["chosen"], seed, evals).history[-1] for seed in protocol.SELECTION_SEEDS]
    train = float(np.mean([r["train_eval_accuracy"] for r in rows]))
    val = float(np.mean([r["val_accuracy"] for r in rows]))
    gap = 100.0 * (train - val)
    met = gap >= OVERFIT_GAP_PT
    (logger.info if met else logger.warning)(
        "overfit check: SGD's train - validation accuracy %.2f pt (needed >= %.1f)",
        gap,
        OVERFIT_GAP_PT,
    )
    return {
        "overfit_validation_gap_pt": gap,
        "overfit_condition_met": met,
        "overfit_validation_train_accuracy": train,
        "overfit_validation_accuracy": val,
    }


def _final_row(res: Any) -> Run:
    last = res.history[-1]
    return {
        **protocol.run_record(res, step_times=None),
        "test_loss": last["test_loss"],
        "train_eval_accuracy": last["train_eval_accuracy"],
        "train_eval_loss": last["train_eval_loss"],
    }


def _timescales_part(data: Dataset, grids: Mapping[str, list], seeds: list[int], *,
                     epochs: int) -> tuple[dict, list[Run], dict]:  # fmt: skip
    """Several time scales vs SGD with momentum on patch-augmented digits."""
    ptrain, ptests, shares = _patch_data(data.train, data.test)
    test_len = len(data.test)
    stacked = Split(
        x=np.concatenate([ptests[k].x for k in TEST_SETS]),
        y=np.concatenate([ptests[k].y for k in TEST_SETS]),
    )
    splits = protocol.three_splits(dataclasses.replace(data, train=ptrain, test=stacked))
    n, bs = data.num_classes, TS_BATCH_SIZE
    model = _mlp({}, n)
    kw = dict(seeds=seeds, num_classes=n, batch_size=bs, epochs=epochs)
    makers = {"ts_sgd": _ts_sgd, "timescales": _timescales}
    selection = {
        arm: _batched(arm, grids[arm], lambda c: model, make, splits, **kw)
        for arm, make in makers.items()
    }
    compiled: dict[str, tuple[optax.GradientTransformation, TrainStep]] = {}

    def final(arm: str) -> Callable[[dict[str, Any], int, Split], Run]:
        def run(config: dict[str, Any], seed: int, test: Split) -> Run:
            if arm not in compiled:  # one compiled step per arm: the runs differ in seed only
                tx = makers[arm](config["learning_rate"])
                compiled[arm] = (tx, make_train_step(model, tx))
            tx, step = compiled[arm]
            tests = {
                name: Split(x=test.x[i * test_len : (i + 1) * test_len],
                            y=test.y[i * test_len : (i + 1) * test_len])
                for i, name in enumerate(TEST_SETS)
            }  # fmt: skip
            res = fit(model, tx, splits.train, epochs=epochs, batch_size=bs, seed=seed,
                      step=step, callbacks=[Evaluate(tests)])  # fmt: skip
            last = res.history[-1]
            return {
                **protocol.run_record(res, step_times=None),
                **{f"{name}_accuracy": last[f"{name}_accuracy"] for name in TEST_SETS},
            }

        return run

    runs = protocol.final_runs({arm: final(arm) for arm in makers}, selection, splits.test,
                               num_classes=n, seeds=seeds)  # fmt: skip
    for r in runs:
        r["part"] = "timescales"
    return selection, runs, {"splits": splits.record, "train_shares": shares}


# --------------------------------------------------------------------------- patch data


def _patch_data(train: Split, test: Split, seed: int = 0):
    """Class-coded 2x2 patch in the top-left corner; train mix and three test sets.

    The patch of class ``y`` is ``0.5 + s * c_y`` (plus a little noise) with a random sign
    ``s`` per example and a fixed code ``c_y`` in ``[-0.5, 0.5]^4``: low noise but not linearly
    separable (each class's mean patch is 0.5 everywhere), the "hard to fit, easy to
    generalise" pattern of Li, Wei & Ma (2019).
    """
    rng = np.random.default_rng(seed)
    codes = rng.uniform(-0.5, 0.5, size=(10, 2, 2)).astype(np.float32)

    def patch(y, r):
        sign = r.choice([-1.0, 1.0], size=(len(y), 1, 1))
        noise = r.normal(0, PATCH_NOISE, (len(y), 2, 2))
        return np.clip(0.5 + sign * codes[y] + noise, 0, 1)

    def with_patch(x, y, r, image=True):
        out = x.copy() if image else np.zeros_like(x)
        out[:, :2, :2, 0] = patch(y, r)
        return out.astype(np.float32)

    kind = rng.choice(3, size=len(train.y), p=PATCH_SHARES)  # 0 clean, 1 patch only, 2 both
    x = train.x.copy()
    x[kind == 1] = with_patch(train.x[kind == 1], train.y[kind == 1], rng, image=False)
    x[kind == 2] = with_patch(train.x[kind == 2], train.y[kind == 2], rng)
    tests = {
        "test": test,  # clean
        "patch": Split(x=with_patch(test.x, test.y, rng, image=False), y=test.y),
        "both": Split(x=with_patch(test.x, test.y, rng), y=test.y),
    }
    shares = {k: float(np.mean(kind == i)) for i, k in enumerate(("clean", "patch", "both"))}
    return Split(x=x, y=train.y), tests, shares


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs both parts and writes ``benchmarks/results/multirate_scratch.*``.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """
    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=len(protocol.FINAL_SEEDS))
    sg_epochs = harness.epochs_from_args(args, full=SG_EPOCHS, quick=QUICK_EPOCHS)
    ts_epochs = harness.epochs_from_args(args, full=TS_EPOCHS, quick=QUICK_EPOCHS)
    grids = QUICK_GRIDS if args.quick else {**SG_GRIDS, **TS_GRIDS}
    sg_data, ts_data = load_dataset(SG_DATASET), load_dataset(TS_DATASET)

    sg_sel, sg_runs, check, sg_splits = _subgroups_part(sg_data, grids, seeds, epochs=sg_epochs)
    ts_sel, ts_runs, ts_record = _timescales_part(ts_data, grids, seeds, epochs=ts_epochs)
    selection = {**sg_sel, **ts_sel}
    budget = protocol.check_equal_budgets(selection)
    runs = sg_runs + ts_runs
    summary = _summary(runs, check, budget)
    sizes = lambda d: f"{len(d.train.y)} train, {len(d.test.y)} test"  # noqa: E731
    config = {
        "model": f"MLP(features=({HIDDEN},)), relu, head; flattened inputs",
        "seeds": seeds,
        "selection": {
            "configs_per_arm": budget,
            "seeds": list(protocol.SELECTION_SEEDS),
            "score": "final-epoch validation accuracy, mean over the selection seeds",
            "runner": "benchmarks.batched.run_batched (sgd, sgd_dropout, ts_sgd, timescales); "
            "optax_multirate.train.fit one at a time (subgroups)",
        },
        "subgroups": {
            "dataset": f"{SG_DATASET}: {sizes(sg_data)}",
            "splits": sg_splits,
            "epochs": sg_epochs,
            "batch_size": SG_BATCH_SIZE,
            "steps_per_epoch": sg_splits["train_examples"] // SG_BATCH_SIZE,
            "sgd": "optax.sgd(learning_rate)",
            "sgd_dropout": "optax.sgd(learning_rate), dropout after the hidden layer",
            "subgroups": f"multirate_subgroups(learning_rate, k={SG_K}, slow_fraction, "
            "seed=<run seed>); forward pass of fast steps at apply_slow_mask(params, opt_state)",
            "overfit_condition": f"SGD's train - validation accuracy >= {OVERFIT_GAP_PT} pt "
            "(chosen step size, selection seeds, eval mode)",
        },
        "timescales": {
            "dataset": f"{TS_DATASET} (scikit-learn 8x8): {sizes(ts_data)}",
            "splits": ts_record["splits"],
            "epochs": ts_epochs,
            "batch_size": TS_BATCH_SIZE,
            "patch": f"class-coded 2x2 top-left patch 0.5 + s * c_y, c_y ~ U(-0.5, 0.5)^4 per "
            f"class, random sign s per example, noise sd {PATCH_NOISE}; train shares "
            f"clean/patch-only/both {ts_record['train_shares']}; validation carved from this "
            "mix; the test split holds the clean, patch-only and patched test images",
            "ts_sgd": f"chain(add_decayed_weights({TS_WEIGHT_DECAY}), sgd(learning_rate, "
            f"{TS_MOMENTUM}))",
            "timescales": f"multirate_timescales(learning_rate, (1, {TS_RATIO}), {TS_MOMENTUM}, "
            f"{TS_WEIGHT_DECAY})",
        },
        "divergence_threshold": protocol.divergence_threshold(sg_data.num_classes),
    }
    harness.write_results(
        NAME,
        args=args,
        config=config,
        runs=runs,
        summary=summary,
        claim_md=CLAIM,
        table_md=_table(runs, summary, selection, seeds, sg_epochs, ts_epochs),
        plot=_plot(runs),
        argv=argv,
        selection=selection,
    )
    logger.info("summary: %s", summary)
    return summary


# --------------------------------------------------------------------------- summary


def _arm_runs(runs: Sequence[Run], arm: str) -> list[Run]:
    return [r for r in runs if r["arm"] == arm]


def _mean(runs: Sequence[Run], arm: str, fn: Callable[[Run], float]) -> float | None:
    vals = [float(fn(r)) for r in _arm_runs(runs, arm)]
    return float(np.mean(vals)) if vals else None


def _paired(runs: Sequence[Run], arm: str, ref: str, fn: Callable[[Run], float]) -> list[float]:
    """Per-seed ``fn(arm) - fn(ref)``, in seed order ([] if either arm has no runs)."""
    a = {r["seed"]: fn(r) for r in _arm_runs(runs, arm)}
    b = {r["seed"]: fn(r) for r in _arm_runs(runs, ref)}
    return [float(a[s] - b[s]) for s in sorted(a) if s in b]


def _put(s: dict[str, Any], key: str, deltas: Sequence[float]) -> None:
    """``key`` (+ its interval and ``_std``), or None everywhere if there are no deltas."""
    if deltas:
        protocol.put_delta(s, key, deltas)
    else:
        low, high = protocol.ci_keys(key)
        s[key] = s[low] = s[high] = None
    s[f"{key}_std"] = float(np.std(deltas, ddof=1)) if len(deltas) > 1 else None


def _summary(runs: Sequence[Run], check: Mapping[str, Any], budget: int) -> dict[str, Any]:
    s: dict[str, Any] = {}
    sg = [r for r in runs if r["part"] == "subgroups"]
    acc = lambda r: r["final_accuracy"]  # noqa: E731
    loss = lambda r: r["test_loss"]  # noqa: E731
    gap = lambda r: r["test_loss"] - r["train_eval_loss"]  # noqa: E731
    for arm, pre in (("subgroups", "subgroups"), ("sgd_dropout", "dropout")):
        d_loss = _paired(sg, arm, "sgd", loss)
        s[f"{pre}_test_loss_delta"] = float(np.mean(d_loss)) if d_loss else None
        _put(s, f"{pre}_accuracy_delta_pt", [100.0 * d for d in _paired(sg, arm, "sgd", acc)])
        d_gap = _paired(sg, arm, "sgd", gap)
        s[f"{pre}_generalization_gap_delta"] = float(np.mean(d_gap)) if d_gap else None
    train_minus_test = [100.0 * (r["train_eval_accuracy"] - acc(r)) for r in _arm_runs(sg, "sgd")]
    s["overfit_gap_pt"] = float(np.mean(train_minus_test)) if train_minus_test else None
    s.update(check)
    for arm in ("sgd", "sgd_dropout", "subgroups"):
        s[f"{arm}_test_loss"] = _mean(sg, arm, loss)
        s[f"{arm}_test_accuracy"] = _mean(sg, arm, acc)
        s[f"{arm}_train_accuracy"] = _mean(sg, arm, lambda r: r["train_eval_accuracy"])
    ts = [r for r in runs if r["part"] == "timescales"]
    for metric, name in zip(("clean", "patch", "both"), TEST_SETS):
        key = lambda r, name=name: r[f"{name}_accuracy"]  # noqa: E731
        deltas = [100.0 * d for d in _paired(ts, "timescales", "ts_sgd", key)]
        _put(s, f"timescales_{metric}_accuracy_delta_pt", deltas)
        for arm in ("ts_sgd", "timescales"):
            s[f"{arm}_{metric}_accuracy"] = _mean(ts, arm, key)
    s["diverged_runs"] = protocol.diverged_runs(runs)
    s["configs_tried"] = budget
    return s


# --------------------------------------------------------------------------- Markdown


def _f(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _ms(xs: Sequence[float]) -> str:
    if not xs:
        return "n/a"
    m, sd = harness.mean_std(xs)
    return f"{m:.4f} ± {sd:.4f}"


def _ci(s: Mapping[str, Any], key: str, spec: str = "+.2f") -> str:
    low, high = protocol.ci_keys(key)
    interval = "" if s[low] is None else f" [{s[low]:{spec}}, {s[high]:{spec}}]"
    return f"{_f(s[key], spec)}{interval}"


def _table(runs, s, selection, seeds, sg_epochs, ts_epochs) -> str:
    sg = [r for r in runs if r["part"] == "subgroups"]
    ts = [r for r in runs if r["part"] == "timescales"]

    def count(arm):
        rs = _arm_runs(runs, arm)
        return f"{sum(r['diverged'] for r in rs)} of {len(rs)}"

    rows = [
        f"Every arm selects from its own grid of {s['configs_tried']} configurations, scored by "
        f"final-epoch validation accuracy on seeds {' / '.join(map(str, protocol.SELECTION_SEEDS))}"
        " (their mean; `diverged` where a seed diverged); the chosen configuration (in bold in "
        f"the selection tables) then runs on {len(seeds)} paired final seeds (test split). "
        "Intervals are 95% t-intervals of the paired per-seed deltas. Diverged: a non-finite "
        "loss or a last-epoch training loss at or above 0.9 ln 10.",
        "",
        f"**Random subgroups** ({SG_DATASET}, MLP {HIDDEN}, batch {SG_BATCH_SIZE}, {sg_epochs} "
        f"epochs; subgroups k = {SG_K}). Selection:",
        "",
        protocol.selection_table(selection, arms=("sgd", "sgd_dropout", "subgroups")),
        "",
        "Overfitting check (before the final runs; SGD's chosen step size, selection seeds): "
        f"train accuracy {_f(s.get('overfit_validation_train_accuracy'), '.4f')}, validation "
        f"{_f(s.get('overfit_validation_accuracy'), '.4f')}: gap "
        f"{_f(s['overfit_validation_gap_pt'], '.2f')} pt (needed >= {OVERFIT_GAP_PT:g}): "
        f"{'met' if s['overfit_condition_met'] else 'NOT met'}.",
        "",
        "| arm | chosen | final test loss | final test acc. | train acc. | train - test acc. "
        "(pt) | train time per run (s) | diverged |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm in ("sgd", "sgd_dropout", "subgroups"):
        rs = _arm_runs(sg, arm)
        chosen = selection[arm]["chosen"]
        rows.append(
            f"| {arm} | {'all diverged' if chosen is None else chosen} "
            f"| {_ms([r['test_loss'] for r in rs])} | {_ms([r['final_accuracy'] for r in rs])} "
            f"| {_ms([r['train_eval_accuracy'] for r in rs])} "
            f"| {_f(_mean(sg, arm, lambda r: 100 * (r['train_eval_accuracy'] - r['final_accuracy'])), '.2f')} "  # noqa: E501
            f"| {_f(_mean(sg, arm, lambda r: r['train_time_s']), '.2f')} | {count(arm)} |"
        )
    rows += [
        "",
        f"Subgroups vs SGD: final test loss Δ {_f(s['subgroups_test_loss_delta'], '+.4f')}, "
        f"accuracy Δ {_ci(s, 'subgroups_accuracy_delta_pt')} pt, generalization gap (test - "
        f"train loss) Δ {_f(s['subgroups_generalization_gap_delta'], '+.4f')}. Dropout vs SGD: "
        f"test loss Δ {_f(s['dropout_test_loss_delta'], '+.4f')}, accuracy Δ "
        f"{_ci(s, 'dropout_accuracy_delta_pt')} pt. SGD's train - test accuracy "
        f"(`overfit_gap_pt`): {_f(s['overfit_gap_pt'], '.2f')} pt. Train accuracy is measured "
        "in eval mode on the training split (validation held out).",
        "",
        f"**Several time scales** (patch-augmented digits, MLP {HIDDEN}, SGD momentum "
        f"{TS_MOMENTUM}, L2 {TS_WEIGHT_DECAY}, batch {TS_BATCH_SIZE}, {ts_epochs} epochs; "
        f"timescales multipliers (1, {TS_RATIO}), its fast step h selected). Selection (on the "
        "validation split of the patched training mix):",
        "",
        protocol.selection_table(selection, arms=("ts_sgd", "timescales")),
        "",
        "| arm | chosen | clean | patch only | image + patch | diverged |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for arm in ("ts_sgd", "timescales"):
        rs = _arm_runs(ts, arm)
        chosen = selection[arm]["chosen"]
        rows.append(
            f"| {arm} | {'all diverged' if chosen is None else chosen} | "
            + " | ".join(_ms([r[f"{name}_accuracy"] for r in rs]) for name in TEST_SETS)
            + f" | {count(arm)} |"
        )
    rows += [
        "",
        "Timescales vs SGD (each with its selected step size), per test set: clean "
        f"{_ci(s, 'timescales_clean_accuracy_delta_pt')} pt, patch only "
        f"{_ci(s, 'timescales_patch_accuracy_delta_pt')} pt, image + patch "
        f"{_ci(s, 'timescales_both_accuracy_delta_pt')} pt.",
        "",
        f"Diverged final runs, all arms: {s['diverged_runs']}. Train time excludes compilation "
        "and evaluation.",
    ]
    return "\n".join(rows)


def _plot(runs):
    def plot(fig):
        panels = [
            ("subgroups", "test_loss", "random subgroups: test loss"),
            ("timescales", "test_accuracy", "time scales: clean test acc."),
            ("timescales", "patch_accuracy", "time scales: patch-only acc."),
        ]
        for i, (part, key, title) in enumerate(panels):
            ax = fig.add_subplot(1, 3, i + 1)
            arms = dict.fromkeys(r["arm"] for r in runs if r["part"] == part)
            for j, arm in enumerate(arms):
                hist = np.array([[h[key] for h in r["history"]] for r in _arm_runs(runs, arm)])
                ep = np.arange(1, hist.shape[1] + 1)
                m, lo, hi = hist.mean(0), hist.min(0), hist.max(0)
                ax.plot(ep, m, color=f"C{j}", label=arm, lw=1.2)
                ax.fill_between(ep, lo, hi, color=f"C{j}", alpha=0.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch (mean; band: min-max over seeds)", fontsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)

    return plot


if __name__ == "__main__":
    main()
