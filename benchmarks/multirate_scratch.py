"""Multirate from scratch: random slow subgroups as a regularizer, and several time scales at once.

Two small reproductions of the paper's from-scratch variants, each on scikit-learn's 8x8
digits with a one-hidden-layer MLP (256 units), every arm trained on the same batches
(``optax_multirate.data.batches``) for the same number of steps, all seeds at once under
``jax.vmap`` (one ``lax.scan`` per epoch):

1. **Random subgroups**: plain SGD, SGD with dropout 0.5, and
   ``multirate_subgroups`` (q = 0.5, k = 5; the forward pass uses ``apply_slow_mask``).
   The paper (small Transformer on Penn Treebank) reports a slightly lower validation loss
   than SGD and SGD with dropout.
2. **Several time scales**: digits with a class-coded 2x2 corner patch (20% of the
   training images clean, 16% patch only, 64% both, after Li, Wei & Ma 2019); SGD with
   momentum at a small step h, at a large step 25 h, and ``multirate_timescales`` with
   multipliers (1, 25): two brains averaged every 25 steps. The paper (WRN-16, patch-augmented
   CIFAR-10) reports that multirate keeps the small step's memorised patch and the large
   step's better clean accuracy.

Run: ``python -m benchmarks.multirate_scratch`` (full: 5 seeds) or ``--quick``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from optax_multirate.data import Split, batches, load_dataset, num_batches
from optax_multirate.models import MLP
from optax_multirate.multirate import (
    apply_slow_mask,
    multirate_subgroups,
    multirate_timescales,
)

logger = logging.getLogger(__name__)

NAME = "multirate_scratch"
HIDDEN = 256
BATCH_SIZE = 32
FULL_SEEDS = 5
# Part 1: random subgroups.
SG_LR = 0.1
SG_K = 5
SG_FRACTION = 0.5
SG_DROPOUT = 0.5
SG_EPOCHS = 150
# Part 2: several time scales.
TS_LR = 0.004  # h (fast); the slow brain and the large-step arm use 25 h = 0.1
TS_RATIO = 25
TS_MOMENTUM = 0.9
TS_WEIGHT_DECAY = 5e-4
TS_EPOCHS = 50  # 50 epochs x 44 steps = 2,200 steps: the last evaluation falls on a merge
PATCH_SHARES = (0.2, 0.16, 0.64)  # clean, patch only, both
PATCH_NOISE = 0.05
QUICK_EPOCHS = 3

CLAIM = (
    "Vlaar & Leimkuhler (ICML 2022; NUMDIFF-16 slides). *Random subgroups*: a small "
    "Transformer on Penn Treebank reaches a minimum validation loss of about 4.84 with "
    "multirate, 4.86 with SGD (rising to 4.96 by epoch 150) and 4.92 with SGD + dropout "
    "(still falling), i.e. a regularizing effect of about 0.02-0.07 in loss (read from the "
    "poster's plot; fraction and k not stated). *Several time scales*: WRN-16 on "
    "patch-augmented CIFAR-10 at epoch 50, h = 0.004 / h = 0.1 / multirate: clean accuracy "
    "69.3 / 71.7 / 76.5%, patch-only 98.9 / 26.6 / 97.2%: multirate memorises the patch and "
    "keeps the best clean accuracy."
)

# --------------------------------------------------------------------------- training core


def _xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _stack_batches(split: Split, seeds: Sequence[int], epoch: int):
    """(seeds, steps, batch, ...) arrays of one epoch's batches, one batch order per seed."""
    xs, ys = [], []
    for s in seeds:
        bs = list(batches(split, BATCH_SIZE, seed=s, epoch=epoch))
        xs.append(np.stack([b["x"] for b in bs]))
        ys.append(np.stack([b["y"] for b in bs]))
    return jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))


def _train(
    name: str,
    init: Callable[[jax.Array], tuple],
    step: Callable,
    apply: Callable,
    train: Split,
    evals: dict[str, Split],
    seeds: Sequence[int],
    epochs: int,
) -> list[dict]:
    """Trains all seeds of one arm at once; returns one run dict per seed.

    ``init(key) -> (params, opt_state)``; ``step((params, opt_state), (x, y, key)) ->
    ((params, opt_state), None)``; ``apply(params, x) -> logits`` (eval mode).
    """
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
    carry = jax.vmap(init)(keys)
    run_epoch = jax.jit(jax.vmap(lambda c, xb, yb, kb: jax.lax.scan(step, c, (xb, yb, kb))[0]))

    @jax.jit
    def evaluate(params):
        def one(p):
            out = {}
            for split_name, sp in evals.items():
                logits = apply(p, jnp.asarray(sp.x))
                y = jnp.asarray(sp.y)
                out[f"{split_name}_loss"] = _xent(logits, y)
                out[f"{split_name}_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == y)
            return out

        return jax.vmap(one)(params)

    steps = num_batches(train, BATCH_SIZE)
    histories: list[list[dict]] = [[] for _ in seeds]
    train_time, compile_time = 0.0, 0.0
    for epoch in range(epochs):
        xb, yb = _stack_batches(train, seeds, epoch)
        kb = jax.vmap(lambda k, e=epoch: jax.random.split(jax.random.fold_in(k, e), steps))(keys)
        t0 = time.perf_counter()
        if epoch == 0:
            lowered = run_epoch.lower(carry, xb, yb, kb).compile()
            compile_time = time.perf_counter() - t0
            t0 = time.perf_counter()
            carry = lowered(carry, xb, yb, kb)
        else:
            carry = run_epoch(carry, xb, yb, kb)
        jax.block_until_ready(carry)
        train_time += time.perf_counter() - t0
        ev = jax.device_get(evaluate(carry[0]))
        for i in range(len(seeds)):
            row = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "train_time_s": train_time}
            row.update({k: float(f"{v[i]:.6g}") for k, v in ev.items()})  # 6 digits: JSON size
            histories[i].append(row)
    logger.info("%s: %s", name, {k: float(np.mean(v)) for k, v in ev.items()})
    return [
        {
            "final": {k: v for k, v in h[-1].items() if k not in ("epoch", "step")},
            "min_test_loss": min(r["test_loss"] for r in h),
            "train_time_s": train_time / len(seeds),  # all seeds ran together
            "compile_time_s": compile_time,
            "history": h,
        }
        for h in histories
    ]


def _mlp_fns(model: MLP, sample_x: np.ndarray):
    def init_params(key):
        return model.init({"params": key, "dropout": key}, jnp.asarray(sample_x), train=False)[
            "params"
        ]

    def apply(params, x, *, train=False, key=None):
        rngs = {"dropout": key} if key is not None else None
        return model.apply({"params": params}, x, train=train, rngs=rngs)

    return init_params, apply


def _sgd_arm(model: MLP, sample_x, tx: optax.GradientTransformation, dropout: bool = False):
    init_params, apply = _mlp_fns(model, sample_x)

    def init(key):
        p = init_params(key)
        return p, tx.init(p)

    def step(carry, batch):
        params, opt_state = carry
        x, y, key = batch
        g = jax.grad(lambda p: _xent(apply(p, x, train=dropout, key=key), y))(params)
        u, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, u), opt_state), None

    return init, step, lambda p, x: apply(p, x)


def _subgroups_arm(model: MLP, sample_x, lr: float):
    init_params, apply = _mlp_fns(model, sample_x)
    tx = multirate_subgroups(lr, SG_K, SG_FRACTION)

    def init(key):
        p = init_params(key)
        mask_key = jax.random.fold_in(key, 1)
        return p, multirate_subgroups(lr, SG_K, SG_FRACTION, seed=mask_key).init(p)

    def step(carry, batch):
        params, opt_state = carry
        x, y, _ = batch
        fwd = apply_slow_mask(params, opt_state)
        g = jax.grad(lambda p: _xent(apply(p, x), y))(fwd)
        u, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, u), opt_state), None

    return init, step, lambda p, x: apply(p, x)


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
    args, seeds = harness.start(NAME, __doc__, argv, full_seeds=FULL_SEEDS)
    sg_epochs = harness.epochs_from_args(args, full=SG_EPOCHS, quick=QUICK_EPOCHS)
    ts_epochs = harness.epochs_from_args(args, full=TS_EPOCHS, quick=QUICK_EPOCHS)
    data = load_dataset("digits")
    sample = data.train.x[:1]

    # -- part 1: random subgroups ------------------------------------------------------------
    plain, drop = MLP((HIDDEN,), num_classes=10), MLP((HIDDEN,), 10, dropout=SG_DROPOUT)
    evals = {"train": data.train, "test": data.test}
    sg_arms = {
        "sgd": _sgd_arm(plain, sample, optax.sgd(SG_LR)),
        "sgd_dropout": _sgd_arm(drop, sample, optax.sgd(SG_LR), dropout=True),
        "subgroups": _subgroups_arm(plain, sample, SG_LR),
    }
    runs: list[dict] = []
    for arm, (init, step, apply) in sg_arms.items():
        out = _train(arm, init, step, apply, data.train, evals, seeds, sg_epochs)
        runs += [{"part": "subgroups", "arm": arm, "seed": s, **r} for s, r in zip(seeds, out)]

    # -- part 2: several time scales on patch-augmented digits -------------------------------
    ptrain, ptests, shares = _patch_data(data.train, data.test)
    big = TS_RATIO * TS_LR

    def sgdm(lr):
        return optax.chain(optax.add_decayed_weights(TS_WEIGHT_DECAY), optax.sgd(lr, TS_MOMENTUM))

    ts_arms = {
        f"sgd_h{TS_LR:g}": _sgd_arm(plain, sample, sgdm(TS_LR)),
        f"sgd_h{big:g}": _sgd_arm(plain, sample, sgdm(big)),
        "timescales": _sgd_arm(
            plain,
            sample,
            multirate_timescales(TS_LR, (1, TS_RATIO), TS_MOMENTUM, TS_WEIGHT_DECAY),
        ),
    }
    for arm, (init, step, apply) in ts_arms.items():
        out = _train(arm, init, step, apply, ptrain, ptests, seeds, ts_epochs)
        runs += [{"part": "timescales", "arm": arm, "seed": s, **r} for s, r in zip(seeds, out)]

    summary = _summary(runs, seeds)
    config = {
        "model": f"MLP(features=({HIDDEN},)), relu, head; flattened 8x8 inputs",
        "dataset": f"digits (scikit-learn 8x8): {len(data.train.y)} train, {len(data.test.y)} test",
        "batch_size": BATCH_SIZE,
        "steps_per_epoch": num_batches(data.train, BATCH_SIZE),
        "seeds": seeds,
        "vmap_over_seeds": True,
        "subgroups": {
            "epochs": sg_epochs,
            "sgd": f"optax.sgd({SG_LR})",
            "sgd_dropout": f"optax.sgd({SG_LR}), dropout {SG_DROPOUT} after the hidden layer",
            "subgroups": f"multirate_subgroups({SG_LR}, k={SG_K}, slow_fraction={SG_FRACTION}),"
            " mask key fold_in(PRNGKey(seed), 1)",
        },
        "timescales": {
            "epochs": ts_epochs,
            "patch": f"class-coded 2x2 top-left patch 0.5 + s * c_y, c_y ~ U(-0.5, 0.5)^4 per "
            f"class, random sign s per example, noise sd {PATCH_NOISE}; train shares "
            f"clean/patch-only/both {shares}",
            "sgd": f"sgd(h, momentum {TS_MOMENTUM}) + L2 {TS_WEIGHT_DECAY}, h = {TS_LR} and "
            f"{big:g}",
            "timescales": f"multirate_timescales({TS_LR}, (1, {TS_RATIO}), {TS_MOMENTUM}, "
            f"{TS_WEIGHT_DECAY})",
            "delta_reference": "per metric, the better of the two single-rate arms (mean over "
            "seeds)",
        },
    }
    harness.write_results(
        NAME,
        args=args,
        config=config,
        runs=runs,
        summary=summary,
        claim_md=CLAIM,
        table_md=_table(runs, summary, seeds, sg_epochs, ts_epochs),
        plot=_plot(runs),
        argv=argv,
    )
    logger.info("summary: %s", summary)
    return summary


def _by(runs, part):
    out: dict[str, list[dict]] = {}
    for r in runs:
        if r["part"] == part:
            out.setdefault(r["arm"], []).append(r)
    return out


def _summary(runs, seeds) -> dict:
    s: dict[str, float | int | bool | None] = {}
    sg = _by(runs, "subgroups")

    def fin(arm, key, part=sg):
        return [r["final"][key] for r in part[arm]]

    for arm in ("sgd_dropout", "subgroups"):
        pre = "dropout" if arm == "sgd_dropout" else "subgroups"
        d_acc = 100 * (np.asarray(fin(arm, "test_accuracy")) - fin("sgd", "test_accuracy"))
        gap = np.subtract(fin(arm, "test_loss"), fin(arm, "train_loss"))
        gap_sgd = np.subtract(fin("sgd", "test_loss"), fin("sgd", "train_loss"))
        d_loss = np.subtract(fin(arm, "test_loss"), fin("sgd", "test_loss"))
        s[f"{pre}_test_loss_delta"] = float(np.mean(d_loss))
        s[f"{pre}_min_test_loss_delta"] = float(
            np.mean([a["min_test_loss"] - b["min_test_loss"] for a, b in zip(sg[arm], sg["sgd"])])
        )
        s[f"{pre}_accuracy_delta_pt"] = float(np.mean(d_acc))
        s[f"{pre}_accuracy_delta_pt_std"] = float(np.std(d_acc, ddof=1)) if len(seeds) > 1 else 0.0
        s[f"{pre}_generalization_gap_delta"] = float(np.mean(gap - gap_sgd))
    for arm in sg:
        s[f"{arm}_test_loss"] = float(np.mean(fin(arm, "test_loss")))
        s[f"{arm}_min_test_loss"] = float(np.mean([r["min_test_loss"] for r in sg[arm]]))
        s[f"{arm}_test_accuracy"] = float(np.mean(fin(arm, "test_accuracy")))

    ts = _by(runs, "timescales")
    single = [a for a in ts if a != "timescales"]
    for metric, key in (("clean", "test_accuracy"), ("patch", "patch_accuracy"),
                        ("both", "both_accuracy")):  # fmt: skip
        means = {a: float(np.mean(fin(a, key, ts))) for a in ts}
        best = max(single, key=lambda a: means[a])
        d = 100 * (np.asarray(fin("timescales", key, ts)) - fin(best, key, ts))
        s[f"timescales_{metric}_accuracy_delta_pt"] = float(np.mean(d))
        s[f"timescales_{metric}_accuracy_delta_pt_std"] = (
            float(np.std(d, ddof=1)) if len(seeds) > 1 else 0.0
        )
        for a in ts:
            s[f"{a}_{metric}_accuracy"] = means[a]
    return s


def _table(runs, s, seeds, sg_epochs, ts_epochs) -> str:
    sg, ts = _by(runs, "subgroups"), _by(runs, "timescales")

    def ms(xs):
        m, sd = harness.mean_std(xs)
        return f"{m:.4f} ± {sd:.4f}"

    rows = [
        f"**Random subgroups** (digits 8x8, MLP 256, plain SGD h = {SG_LR}, batch {BATCH_SIZE},"
        f" {sg_epochs} epochs, {len(seeds)} seeds, mean ± std):",
        "",
        "| arm | final test loss | min test loss | final test acc. | train loss | "
        "test - train loss | train time per seed (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm, rs in sg.items():
        rows.append(
            f"| {arm} | {ms([r['final']['test_loss'] for r in rs])} | "
            f"{ms([r['min_test_loss'] for r in rs])} | "
            f"{ms([r['final']['test_accuracy'] for r in rs])} | "
            f"{ms([r['final']['train_loss'] for r in rs])} | "
            f"{ms([r['final']['test_loss'] - r['final']['train_loss'] for r in rs])} | "
            f"{rs[0]['train_time_s']:.2f} |"
        )
    rows += [
        "",
        f"Subgroups vs SGD: final test loss Δ {s['subgroups_test_loss_delta']:+.4f}, minimum "
        f"test loss Δ {s['subgroups_min_test_loss_delta']:+.4f}, accuracy Δ "
        f"{s['subgroups_accuracy_delta_pt']:+.2f} ± {s['subgroups_accuracy_delta_pt_std']:.2f} pt"
        f", generalization gap Δ {s['subgroups_generalization_gap_delta']:+.4f}. Dropout vs "
        f"SGD: test loss Δ {s['dropout_test_loss_delta']:+.4f}, accuracy Δ "
        f"{s['dropout_accuracy_delta_pt']:+.2f} pt.",
        "",
        f"**Several time scales** (patch-augmented digits, MLP 256, SGD momentum "
        f"{TS_MOMENTUM}, L2 {TS_WEIGHT_DECAY}, {ts_epochs} epochs, {len(seeds)} seeds; "
        "accuracy on three test sets):",
        "",
        "| arm | clean | patch only | image + patch |",
        "| --- | ---: | ---: | ---: |",
    ]
    for arm, rs in ts.items():
        rows.append(
            f"| {arm} | {ms([r['final']['test_accuracy'] for r in rs])} | "
            f"{ms([r['final']['patch_accuracy'] for r in rs])} | "
            f"{ms([r['final']['both_accuracy'] for r in rs])} |"
        )
    rows += [
        "",
        "Timescales vs the better single-rate arm on each test set: clean "
        f"{s['timescales_clean_accuracy_delta_pt']:+.2f} ± "
        f"{s['timescales_clean_accuracy_delta_pt_std']:.2f} pt, patch only "
        f"{s['timescales_patch_accuracy_delta_pt']:+.2f} ± "
        f"{s['timescales_patch_accuracy_delta_pt_std']:.2f} pt, image + patch "
        f"{s['timescales_both_accuracy_delta_pt']:+.2f} pt.",
        "",
        "All seeds of an arm train together under `jax.vmap` (one `lax.scan` per epoch), so "
        "times are per seed (the arm's time / seeds), compile excluded.",
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
            by = _by(runs, part)
            for j, (arm, rs) in enumerate(by.items()):
                hist = np.array([[h[key] for h in r["history"]] for r in rs])
                ep = np.arange(1, hist.shape[1] + 1)
                m, sd = hist.mean(0), hist.std(0)
                ax.plot(ep, m, color=f"C{j}", label=arm, lw=1.2)
                ax.fill_between(ep, m - sd, m + sd, color=f"C{j}", alpha=0.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
            if key == "test_loss":
                ax.set_yscale("log")
                ax.set_ylim(0.02, 0.3)
                ax.set_xlabel("epoch (log-scale loss)")

    return plot


if __name__ == "__main__":
    main()
