"""LeRaC: SGD baseline against the learning-rate curriculum, paired by seed, on three small sets.

A reproduction of the paper's claim at CPU scale. Data: scikit-learn digits
(train split cut 75/25 into train/validation, i.e. 60/20/20 overall with the test split),
mnist1d and the 5,000-digit MNIST subset (10% of train held out for validation). Models: an
MLP with 4 Dense layers (depths 0..3, the head is depth 3) on digits and mnist1d, a
Conv-Conv-Dense-Dense CNN (:class:`ConvNet`) on MNIST. Base: SGD with momentum 0.9, coupled
weight decay 5e-4, cosine decay from 0.05, batch 64. LeRaC: ``r = (1, 1e-1, 1e-2, 1e-3)``
placed last in the chain, ``k`` = 5 epochs of steps (paper mode).

Arms (same init, batch order and epochs per seed): ``sgd`` (baseline) and ``lerac`` on every
set (the primary comparison); on the MLP sets also ``lerac_staircase`` (the authors' code form:
x10 once per epoch, all units at the base rate after 3 epochs), ``adam`` and ``adam_lerac``
(LeRaC placed after Adam), the ablations ``reversed`` (deep units fast) and ``uniform_warmup``
(every unit starts at 10^-1.5 and grows like LeRaC) and the sanity arm ``lerac_k0`` (must equal
the baseline bit for bit). The MLP seeds run at once under ``jax.vmap``, each epoch one
``lax.scan``. The CNN runs seed-major, and within a seed the two arms step in lockstep (SGD
step t, LeRaC step t, ...), each step timed: the step-time ratio is the ratio of the medians
of those steps. An MLP step-time ratio is measured the same way on separately timed steps.

Run: ``python -m benchmarks.lerac`` (full) or ``--quick``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from optax_multirate.data import Split, epoch_arrays, load_dataset, num_batches, validation_split
from optax_multirate.lerac import LeracState, lerac, lerac_depth_labels
from optax_multirate.models import MLP

logger = logging.getLogger(__name__)

NAME = "lerac"
BATCH_SIZE = 64
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
ADAM_LR = 1e-3
SCALES = (1.0, 1e-1, 1e-2, 1e-3)
K_EPOCHS = 5
MLP_FEATURES = (128, 128, 128)
CNN_FEATURES = (8, 16)
CNN_DENSE = 64
FULL = {"mlp_seeds": 12, "cnn_seeds": 5, "mlp_epochs": 30, "cnn_epochs": 12}
QUICK = {"mlp_seeds": 2, "cnn_seeds": 1, "mlp_epochs": 2, "cnn_epochs": 1}
QUICK_EXAMPLES = 512
VAL_FRACTION = {"digits": 0.25, "mnist1d": 0.1, "mnist_subset": 0.1}
PREFIX = {"digits": "digits", "mnist1d": "mnist1d", "mnist_subset": "mnist"}
TIMED_STEPS = {"mlp": 2000}
MLP_ARMS = ("sgd", "lerac", "lerac_staircase", "adam", "adam_lerac", "reversed",
            "uniform_warmup", "lerac_k0")  # fmt: skip
QUICK_MLP_ARMS = ("sgd", "lerac")
CNN_ARMS = ("sgd", "lerac")

CLAIM = (
    "Croitoru et al., *Learning Rate Curriculum* (IJCV 2024): on 12 data sets and 8 "
    "architectures (ResNet-18, WRN, DenseNet-121, CvT-13, BERT, LSTM, SepTr, YOLOv5) LeRaC "
    "beats conventional training everywhere, at no extra training time. The gains are small "
    "(believed well under 2 points; the paper's tables could not be read, so no figure is "
    "quoted). Our goal: the paired 95% interval of LeRaC - SGD above 0 on at least 2 of the "
    "3 sets, and a step-time ratio <= 1.02."
)


# --------------------------------------------------------------------------- model


class ConvNet(nn.Module):
    """A Conv-Conv-Dense-Dense CNN: 3x3 convs each followed by a 2x2 max-pool, flatten,
    a hidden Dense layer, the head (4 depths).

    ``models.CNN`` ends in global average pooling; at the width two CPU cores allow (8 and 16
    channels) it reached only 55% test accuracy with SGD on the MNIST subset in 10 epochs,
    so this benchmark flattens instead.
    """

    features: Sequence[int] = CNN_FEATURES
    dense: int = CNN_DENSE
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        del train
        for i, c in enumerate(self.features):
            x = nn.relu(nn.Conv(c, (3, 3), padding="SAME", name=f"Conv_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(self.dense, name="Dense_0")(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes, name="head")(x)


# --------------------------------------------------------------------------- arms


def _base_sgd(total_steps: int) -> optax.GradientTransformation:
    lr = optax.cosine_decay_schedule(LEARNING_RATE, total_steps)
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(lr, momentum=MOMENTUM))


def _base_adam(total_steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(ADAM_LR, total_steps))


def make_tx(
    arm: str, depth: Any, steps_per_epoch: int, epochs: int
) -> optax.GradientTransformation:
    """The optimizer of one arm (every LeRaC arm places the curriculum last)."""
    total = steps_per_epoch * epochs
    k = K_EPOCHS * steps_per_epoch
    n = 1 + max(jax.tree.leaves(depth))
    if arm == "sgd":
        return _base_sgd(total)
    if arm == "adam":
        return _base_adam(total)
    if arm == "lerac":
        return lerac(_base_sgd(total), depth, k=k, initial_scales=SCALES[:n])
    if arm == "adam_lerac":
        return lerac(_base_adam(total), depth, k=k, initial_scales=SCALES[:n])
    if arm == "lerac_staircase":
        return lerac(_base_sgd(total), depth, initial_scales=SCALES[:n], mode="staircase",
                     steps_per_tick=steps_per_epoch)  # fmt: skip
    if arm == "reversed":
        return lerac(_base_sgd(total), depth, k=k, initial_scales=SCALES[:n][::-1],
                     allow_non_monotone=True)  # fmt: skip
    if arm == "uniform_warmup":
        return lerac(_base_sgd(total), depth, k=k, initial_scales=(10**-1.5,) * n)
    if arm == "lerac_k0":
        return lerac(_base_sgd(total), depth, k=0, initial_scales=SCALES[:n])
    raise ValueError(f"unknown arm {arm!r}")


# --------------------------------------------------------------------------- training


def _find_lerac(opt_state: Any) -> LeracState | None:
    """The LeRaC state inside ``opt_state`` (None for an arm without one)."""
    return optax.tree_utils.tree_get(
        opt_state, "LeracState", filtering=lambda _, v: isinstance(v, LeracState)
    )


def _loss_fn(model: nn.Module) -> Callable[..., tuple[jax.Array, jax.Array]]:
    def loss(params, x, y):
        logits = model.apply({"params": params}, x, train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce, jnp.mean(jnp.argmax(logits, -1) == y)

    return loss


def _train_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable[..., Any]:
    grad_fn = jax.value_and_grad(_loss_fn(model), has_aux=True)

    def step(params, opt_state, x, y):
        (loss, _), g = grad_fn(params, x, y)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _epoch_fn(model: nn.Module, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """One epoch of one seed as a ``lax.scan``; also returns each step's LeRaC multipliers."""
    step = _train_step(model, tx)

    def epoch(params, opt_state, xs, ys):
        def body(carry, batch):
            p, s = carry
            p, s, loss = step(p, s, *batch)
            ls = _find_lerac(s)
            return (p, s), (loss, ls.scales if ls is not None else jnp.zeros([0]))

        (params, opt_state), (losses, scales) = jax.lax.scan(body, (params, opt_state),
                                                             (xs, ys))  # fmt: skip
        return params, opt_state, losses, scales

    return epoch


def _correct_fn(model: nn.Module) -> Callable[..., jax.Array]:
    def correct(params, x, y):
        logits = model.apply({"params": params}, x, train=False)
        return jnp.argmax(logits, -1) == y

    return correct


def _take(tree: Any, i: int) -> Any:
    """Seed ``i`` of a tree stacked over seeds."""
    return jax.tree.map(lambda x: x[i], tree)


def _epoch_batches(split: Split, seeds: Sequence[int], epoch: int) -> tuple[np.ndarray, ...]:
    arrs = [epoch_arrays(split, BATCH_SIZE, seed=s, epoch=epoch) for s in seeds]
    return np.stack([a["x"] for a in arrs]), np.stack([a["y"] for a in arrs])


def train_arm(
    model: nn.Module,
    tx: optax.GradientTransformation,
    init_params: Any,
    seeds: Sequence[int],
    train: Split,
    val: Split,
    test: Split,
    epochs: int,
    correct: Callable[..., jax.Array],
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains one arm on all ``seeds`` at once (``vmap`` over seeds, ``scan`` over steps).

    ``correct(params, x, y)``, per-example correctness over a stack of params, is jitted once
    and shared by the arms; it runs on validation and test examples together;
    ``cache`` keeps the compiled epoch program between calls with the same shapes (seeds).

    Returns per-seed curves (``test``, ``val``, ``train_loss``: ``[seed][epoch]``), the
    LeRaC multipliers of seed 0 per step (``scales``: ``[step][depth]``), the final params
    (for the k = 0 check), and times.
    """
    epoch = jax.jit(jax.vmap(_epoch_fn(model, tx)))
    params = init_params  # stacked over seeds
    opt_state = jax.jit(jax.vmap(tx.init))(params)
    eval_x = np.concatenate([val.x, test.x])
    eval_y = np.concatenate([val.y, test.y])
    test_c, val_c, loss_c, scales = [], [], [], []
    compile_s, train_s = 0.0, 0.0
    for e in range(epochs):
        xs, ys = _epoch_batches(train, seeds, e)
        t0 = time.perf_counter()
        if e == 0:
            if cache is not None and "epoch" in cache:
                epoch = cache["epoch"]
            else:
                epoch = epoch.lower(params, opt_state, xs, ys).compile()
                compile_s = time.perf_counter() - t0
                if cache is not None:
                    cache["epoch"] = epoch
            t0 = time.perf_counter()
        params, opt_state, losses, sc = epoch(params, opt_state, xs, ys)
        jax.block_until_ready(params)
        train_s += time.perf_counter() - t0
        loss_c.append(np.asarray(losses).mean(axis=1))
        ok = np.asarray(correct(params, eval_x, eval_y))
        val_c.append(ok[:, : len(val)].mean(1))
        test_c.append(ok[:, len(val) :].mean(1))
        scales.append(np.asarray(sc)[0])
    return {
        "test": np.stack(test_c, 1),
        "val": np.stack(val_c, 1),
        "train_loss": np.stack(loss_c, 1),
        "scales": np.concatenate(scales, 0),
        "params": params,
        "compile_time_s": compile_s,
        "train_time_s": train_s,
    }


def train_lockstep(
    model: nn.Module,
    txs: Mapping[str, optax.GradientTransformation],
    init_params: Any,
    seed: int,
    train: Split,
    val: Split,
    test: Split,
    epochs: int,
    correct: Callable[..., jax.Array],
    programs: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """One seed, every arm in lockstep (arm a step t, arm b step t, ...), each step timed.

    The arms see the same device batch; each step program is compiled ahead of time once
    (kept in ``programs`` across seeds) so no step time includes a compile. Returns per arm the
    curves (``[1][epoch]``), final params (leading axis 1) and per-step times in ms.
    """
    eval_x = np.concatenate([val.x, test.x])
    eval_y = np.concatenate([val.y, test.y])
    state = {arm: (init_params, jax.jit(tx.init)(init_params)) for arm, tx in txs.items()}
    out = {
        arm: {"test": [], "val": [], "train_loss": [], "step_ms": [], "compile_time_s": 0.0,
              "train_time_s": 0.0}
        for arm in txs
    }  # fmt: skip
    for e in range(epochs):
        batch = epoch_arrays(train, BATCH_SIZE, seed=seed, epoch=e)
        losses: dict[str, list[jax.Array]] = {arm: [] for arm in txs}
        for t in range(batch["x"].shape[0]):
            x, y = jnp.asarray(batch["x"][t]), jnp.asarray(batch["y"][t])
            for arm, tx in txs.items():
                if arm not in programs:
                    t0 = time.perf_counter()
                    step = jax.jit(_train_step(model, tx))
                    programs[arm] = step.lower(*state[arm], x, y).compile()
                    out[arm]["compile_time_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                p, s, loss = programs[arm](*state[arm], x, y)
                jax.block_until_ready(loss)
                dt = time.perf_counter() - t0
                out[arm]["step_ms"].append(1e3 * dt)
                out[arm]["train_time_s"] += dt
                state[arm] = (p, s)
                losses[arm].append(loss)
        for arm in txs:
            ok = np.asarray(correct(jax.tree.map(lambda v: v[None], state[arm][0]), eval_x,
                                    eval_y))[0]  # fmt: skip
            out[arm]["val"].append(ok[: len(val)].mean())
            out[arm]["test"].append(ok[len(val) :].mean())
            out[arm]["train_loss"].append(float(np.mean(jax.device_get(losses[arm]))))
    for arm in txs:
        for key in ("test", "val", "train_loss"):
            out[arm][key] = np.asarray(out[arm][key])[None]
        out[arm]["params"] = jax.tree.map(lambda v: v[None], state[arm][0])
    return out


# --------------------------------------------------------------------------- timing


def time_steps(
    model: nn.Module,
    txs: Mapping[str, optax.GradientTransformation],
    params: Any,
    split: Split,
    n: int,
) -> dict[str, float]:
    """Median wall time (ms) of one jitted train step per arm, arms interleaved step by step."""
    batch = epoch_arrays(split, BATCH_SIZE, seed=0)
    xs, ys = jnp.asarray(batch["x"][0]), jnp.asarray(batch["y"][0])
    steps, states = {}, {}
    for arm, tx in txs.items():
        steps[arm] = jax.jit(_train_step(model, tx))
        states[arm] = (params, jax.jit(tx.init)(params))
        jax.block_until_ready(steps[arm](*states[arm], xs, ys))  # compile
    times: dict[str, list[float]] = {arm: [] for arm in txs}
    for _ in range(n):
        for arm in txs:
            t0 = time.perf_counter()
            p, s, loss = steps[arm](*states[arm], xs, ys)
            jax.block_until_ready(loss)
            times[arm].append(1e3 * (time.perf_counter() - t0))
            states[arm] = (p, s)
    return {arm: harness.median_ms(t) for arm, t in times.items()}


# --------------------------------------------------------------------------- one data set


def _subset(split: Split, n: int) -> Split:
    return Split(x=split.x[:n], y=split.y[:n])


def _model(name: str, num_classes: int) -> nn.Module:
    if name == "mnist_subset":
        return ConvNet(num_classes=num_classes)
    return MLP(features=MLP_FEATURES, num_classes=num_classes)


def run_dataset(
    name: str,
    arms: Sequence[str],
    seeds: Sequence[int],
    epochs: int,
    quick: bool,
    vmap_seeds: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs every arm on one data set; returns the runs and per-arm raw results."""
    data = load_dataset(name)
    train, val = validation_split(data.train, VAL_FRACTION[name], seed=0)
    test = data.test
    if quick:
        train, test = _subset(train, QUICK_EXAMPLES), _subset(test, QUICK_EXAMPLES)
    model = _model(name, data.num_classes)
    sample = jnp.asarray(train.x[:1])
    init = jax.jit(jax.vmap(lambda s: model.init(jax.random.key(s), sample, train=False)["params"]))
    params = init(jnp.asarray(seeds, jnp.uint32))  # stacked over seeds
    params0 = jax.tree.map(lambda x: x[0], params)
    depth = lerac_depth_labels(model, params0, sample, train=False)
    correct = jax.jit(jax.vmap(_correct_fn(model), in_axes=(0, None, None)))
    spe = num_batches(train, BATCH_SIZE)
    raw: dict[str, Any] = {}
    if vmap_seeds:
        for arm in arms:
            logger.info("%s: arm %s, %d seeds (vmap), %d epochs", name, arm, len(seeds), epochs)
            tx = make_tx(arm, depth, spe, epochs)
            raw[arm] = train_arm(model, tx, params, seeds, train, val, test, epochs, correct)
    else:  # seed-major: one seed at a time, the arms in lockstep, every step timed
        txs = {arm: make_tx(arm, depth, spe, epochs) for arm in arms}
        programs: dict[str, Any] = {}
        per = []
        for i, seed in enumerate(seeds):
            logger.info("%s: seed %d, arms %s in lockstep, %d epochs", name, seed, arms, epochs)
            per.append(train_lockstep(model, txs, _take(params, i), seed,
                                      train, val, test, epochs, correct, programs))  # fmt: skip
        for arm in arms:
            rs = [r[arm] for r in per]
            raw[arm] = {
                key: np.concatenate([r[key] for r in rs], 0)
                for key in ("test", "val", "train_loss")
            }
            raw[arm]["scales"] = np.zeros((0, 0))
            raw[arm]["params"] = jax.tree.map(
                lambda *x: jnp.concatenate(x), *[r["params"] for r in rs]
            )
            raw[arm]["step_ms"] = [t for r in rs for t in r["step_ms"]]
            raw[arm]["compile_time_s"] = float(np.sum([r["compile_time_s"] for r in rs]))
            raw[arm]["train_time_s"] = float(np.sum([r["train_time_s"] for r in rs]))
    runs = []
    for arm in arms:
        r = raw[arm]
        for i, seed in enumerate(seeds):
            best = int(np.argmax(r["val"][i]))
            runs.append({
                "dataset": name,
                "arm": arm,
                "seed": seed,
                "final_accuracy": float(r["test"][i, -1]),
                "best_val_epoch": best + 1,
                "test_accuracy_at_best_val": float(r["test"][i, best]),
                "early_train_loss": float(np.mean(r["train_loss"][i, : min(K_EPOCHS, epochs)])),
                "test_accuracy_curve": [round(float(v), 5) for v in r["test"][i]],
                "val_accuracy_curve": [round(float(v), 5) for v in r["val"][i]],
                "train_loss_curve": [round(float(v), 5) for v in r["train_loss"][i]],
            })  # fmt: skip
    info = {
        "model": type(model).__name__,
        "train_examples": len(train),
        "val_examples": len(val),
        "test_examples": len(test),
        "steps_per_epoch": spe,
        "k_steps": K_EPOCHS * spe,
        "depths": 1 + max(jax.tree.leaves(depth)),
        "raw": raw,
        "model_obj": model,
        "params0": params0,
        "train": train,
        "depth": depth,
    }
    return runs, info


# --------------------------------------------------------------------------- summary


def _paired(runs: Sequence[Mapping[str, Any]], ds: str, a: str, b: str, key: str):
    xs = [r[key] for r in runs if r["dataset"] == ds and r["arm"] == a]
    ys = [r[key] for r in runs if r["dataset"] == ds and r["arm"] == b]
    if not xs or not ys:
        return None
    m, lo, hi = harness.paired_ci(xs, ys)
    wins = sum(y > x for x, y in zip(xs, ys))
    ties = sum(y == x for x, y in zip(xs, ys))
    return 100 * m, 100 * lo, 100 * hi, wins, ties, len(xs)


def summarise(runs, infos, timing) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for ds, info in infos.items():
        p = PREFIX[ds]
        for arm in info["raw"]:
            accs = [r["final_accuracy"] for r in runs if r["dataset"] == ds and r["arm"] == arm]
            m, sd = harness.mean_std(accs)
            s[f"{p}_{arm}_accuracy"], s[f"{p}_{arm}_accuracy_std"] = m, sd
        d = _paired(runs, ds, "sgd", "lerac", "final_accuracy")
        s[f"{p}_accuracy_delta_pt"], s[f"{p}_accuracy_delta_ci_low_pt"] = d[0], d[1]
        s[f"{p}_accuracy_delta_ci_high_pt"] = d[2]
        s[f"{p}_lerac_wins"], s[f"{p}_lerac_ties"], s[f"{p}_pairs"] = d[3], d[4], d[5]
        d = _paired(runs, ds, "sgd", "lerac", "test_accuracy_at_best_val")
        s[f"{p}_best_val_delta_pt"] = d[0]
        s[f"{p}_best_val_delta_ci_low_pt"], s[f"{p}_best_val_delta_ci_high_pt"] = d[1], d[2]
        d = _paired(runs, ds, "sgd", "lerac", "early_train_loss")
        s[f"{p}_early_train_loss_delta"] = d[0] / 100
        for base, arm in (("sgd", "lerac_staircase"), ("adam", "adam_lerac"),
                          ("sgd", "reversed"), ("sgd", "uniform_warmup")):  # fmt: skip
            d = _paired(runs, ds, base, arm, "final_accuracy")
            if d is not None:
                s[f"{p}_{arm}_delta_pt"] = d[0]
                s[f"{p}_{arm}_delta_ci_low_pt"], s[f"{p}_{arm}_delta_ci_high_pt"] = d[1], d[2]
        raw = info["raw"]
        if "lerac_k0" in raw:
            s[f"{p}_k0_bitwise_equal"] = bool(
                all(jax.tree.leaves(jax.tree.map(
                    lambda a, b: bool(np.array_equal(a, b)),
                    raw["lerac_k0"]["params"], raw["sgd"]["params"])))
            )  # fmt: skip
    lows = [s[f"{PREFIX[ds]}_accuracy_delta_ci_low_pt"] for ds in infos]
    highs = [s[f"{PREFIX[ds]}_accuracy_delta_ci_high_pt"] for ds in infos]
    s["sets_interval_above_0"] = sum(lo is not None and lo > 0 for lo in lows)
    s["sets_interval_below_0"] = sum(hi is not None and hi < 0 for hi in highs)
    s.update(timing)
    s["goal_reached"] = bool(s["sets_interval_above_0"] >= 2 and s["step_time_ratio"] <= 1.02)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in s.items()}  # fmt: skip


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(summary: Mapping[str, Any], infos: Mapping[str, Any], epochs: dict) -> str:
    lines = [
        "| data set (model) | SGD | LeRaC | LeRaC - SGD (pt) | 95% CI (pt) | wins / pairs "
        "| at best val. epoch (pt) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for ds, info in infos.items():
        p = PREFIX[ds]
        lines.append(
            f"| {ds} ({info['model']}) | {100 * summary[f'{p}_sgd_accuracy']:.2f} ± "
            f"{100 * summary[f'{p}_sgd_accuracy_std']:.2f} | "
            f"{100 * summary[f'{p}_lerac_accuracy']:.2f} ± "
            f"{100 * summary[f'{p}_lerac_accuracy_std']:.2f} | "
            f"{summary[f'{p}_accuracy_delta_pt']:+.2f} | "
            f"[{_fmt(summary[f'{p}_accuracy_delta_ci_low_pt'], '+.2f')}, "
            f"{_fmt(summary[f'{p}_accuracy_delta_ci_high_pt'], '+.2f')}] | "
            f"{summary[f'{p}_lerac_wins']} / {summary[f'{p}_pairs']} | "
            f"{summary[f'{p}_best_val_delta_pt']:+.2f} |"
        )
    lines += [
        "",
        "Secondary arms and ablations (paired difference of final test accuracy, pt, 95% CI):",
        "",
        "| data set | staircase - SGD | Adam+LeRaC - Adam | reversed - SGD | "
        "uniform warmup - SGD | k = 0 bitwise = SGD |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ds in infos:
        p = PREFIX[ds]
        cells = []
        for arm in ("lerac_staircase", "adam_lerac", "reversed", "uniform_warmup"):
            if f"{p}_{arm}_delta_pt" in summary:
                cells.append(
                    f"{summary[f'{p}_{arm}_delta_pt']:+.2f} "
                    f"[{_fmt(summary[f'{p}_{arm}_delta_ci_low_pt'], '+.2f')}, "
                    f"{_fmt(summary[f'{p}_{arm}_delta_ci_high_pt'], '+.2f')}]"
                )
            else:
                cells.append("not run")
        k0 = summary.get(f"{p}_k0_bitwise_equal")
        cells.append("not run" if k0 is None else ("yes" if k0 else "NO"))
        lines.append(f"| {ds} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracies of every arm (mean ± std over seeds, %):",
        "",
        "| data set | " + " | ".join(MLP_ARMS) + " |",
        "| --- |" + " ---: |" * len(MLP_ARMS),
    ]
    for ds in infos:
        p = PREFIX[ds]
        lines.append(f"| {ds} | " + " | ".join(
            f"{100 * summary[f'{p}_{a}_accuracy']:.2f} ± "
            f"{100 * summary[f'{p}_{a}_accuracy_std']:.2f}"
            if f"{p}_{a}_accuracy" in summary else "-" for a in MLP_ARMS) + " |")  # fmt: skip
    n_above = summary["sets_interval_above_0"]
    lines += [
        "",
        f"Step time (median over the {summary['timed_steps_cnn']} training steps of each CNN "
        f"arm, MNIST, batch {BATCH_SIZE}, the two arms interleaved step by step): "
        f"SGD {summary['sgd_step_time_ms']:.3f} ms, LeRaC "
        f"{summary['lerac_step_time_ms']:.3f} ms, **ratio {summary['step_time_ratio']:.3f}**; "
        f"MLP on mnist1d ({summary['timed_steps_mlp']} steps): "
        f"{summary['mlp_sgd_step_time_ms']:.3f} vs {summary['mlp_lerac_step_time_ms']:.3f} ms, "
        f"ratio {summary['mlp_step_time_ratio']:.3f}.",
        "",
        f"Goal: interval above 0 on >= 2 of 3 sets (here {n_above}; below 0 on "
        f"{summary['sets_interval_below_0']}) and step-time ratio <= 1.02: "
        f"**{'reached' if summary['goal_reached'] else 'not reached'}**.",
        "",
        f"Epochs: {epochs['mlp']} (MLP sets), {epochs['cnn']} (CNN); k = {K_EPOCHS} epochs "
        "(paper mode); cosine decay of the base rate over the whole run; final test accuracy "
        "is the accuracy after the last epoch; 'at best val. epoch' is the test accuracy at the "
        "epoch of best validation accuracy.",
    ]
    return "\n".join(lines)


def make_plot(infos: Mapping[str, Any], epochs: dict) -> Callable[[Any], None]:
    def plot(fig: Any) -> None:
        fig.set_size_inches(12, 7.5)
        ax = fig.add_subplot(2, 2, 1)
        info = infos.get("mnist1d") or next(iter(infos.values()))
        raw, spe = info["raw"], info["steps_per_epoch"]
        steps = (K_EPOCHS + 2) * spe
        lr = np.asarray(optax.cosine_decay_schedule(LEARNING_RATE, spe * epochs["mlp"])(
            np.arange(steps)))  # fmt: skip
        for arm, style in (("lerac", "-"), ("lerac_staircase", "--")):
            if arm not in raw:
                continue
            sc = raw[arm]["scales"][:steps]
            for j in range(sc.shape[1]):
                lab = f"depth {j}" if arm == "lerac" else None
                ax.plot(lr[: len(sc)] * sc[:, j], style, color=f"C{j}", label=lab)
        ax.plot(lr, ":", color="k", label="SGD (all depths)")
        ax.set_yscale("log")
        ax.set_xlabel(f"step ({spe} per epoch; solid: paper, dashed: staircase)")
        ax.set_ylabel("learning rate")
        ax.set_title(f"Per-depth rates, first {K_EPOCHS + 2} epochs ({info['model']})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        for i, (ds, inf) in enumerate(infos.items()):
            ax = fig.add_subplot(2, 2, 2 + i)
            for j, arm in enumerate(inf["raw"]):
                if arm == "lerac_k0":
                    continue
                t = 100 * inf["raw"][arm]["test"]
                e = np.arange(1, t.shape[1] + 1)
                ax.plot(e, t.mean(0), color=f"C{j}", label=arm,
                        lw=2 if arm in ("sgd", "lerac") else 1)  # fmt: skip
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%, mean over seeds)")
            ax.set_title(f"{ds} ({inf['model']}, {t.shape[0]} seed{'s' if t.shape[0] > 1 else ''})")
            start = t.shape[1] // 5  # leave the first epochs off the scale
            lo = min(100 * r["test"].mean(0)[start:].min() for r in inf["raw"].values())
            hi = max(100 * r["test"].mean(0).max() for r in inf["raw"].values())
            ax.set_ylim(max(lo - 1, 0), min(hi + 0.5, 100))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

    return plot


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the LeRaC benchmark and writes its results.

    ``argv``: the command line (None: ``sys.argv[1:]``). Returns the summary.
    """
    args, mlp_seeds = harness.start(
        NAME, __doc__, argv, full_seeds=FULL["mlp_seeds"], quick_seeds=QUICK["mlp_seeds"]
    )
    cfg = QUICK if args.quick else FULL
    cnn_seeds = list(range(min(len(mlp_seeds), cfg["cnn_seeds"])))
    epochs = {
        k: harness.epochs_from_args(args, full=FULL[f"{k}_epochs"], quick=QUICK[f"{k}_epochs"])
        for k in ("mlp", "cnn")
    }
    mlp_arms = QUICK_MLP_ARMS if args.quick else MLP_ARMS
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    for ds in ("digits", "mnist1d", "mnist_subset"):
        cnn = ds == "mnist_subset"
        r, info = run_dataset(
            ds,
            CNN_ARMS if cnn else mlp_arms,
            cnn_seeds if cnn else mlp_seeds,
            epochs["cnn" if cnn else "mlp"],
            args.quick,
            vmap_seeds=not cnn,
        )
        runs += r
        infos[ds] = info
        logger.info("%s done at %.0f s", ds, time.perf_counter() - t_start)
    cnn = infos["mnist_subset"]["raw"]
    timing = {
        "timed_steps_cnn": len(cnn["sgd"]["step_ms"]),
        "sgd_step_time_ms": harness.median_ms(cnn["sgd"]["step_ms"]),
        "lerac_step_time_ms": harness.median_ms(cnn["lerac"]["step_ms"]),
    }
    timing["step_time_ratio"] = timing["lerac_step_time_ms"] / timing["sgd_step_time_ms"]
    info = infos["mnist1d"]
    n_mlp = 50 if args.quick else TIMED_STEPS["mlp"]
    txs = {arm: make_tx(arm, info["depth"], info["steps_per_epoch"], epochs["mlp"])
           for arm in ("sgd", "lerac")}  # fmt: skip
    med = time_steps(info["model_obj"], txs, info["params0"], info["train"], n_mlp)
    timing["timed_steps_mlp"] = n_mlp
    timing["mlp_sgd_step_time_ms"] = med["sgd"]
    timing["mlp_lerac_step_time_ms"] = med["lerac"]
    timing["mlp_step_time_ratio"] = med["lerac"] / med["sgd"]
    summary = summarise(runs, infos, timing)
    summary["total_time_s"] = time.perf_counter() - t_start
    config = {
        "datasets": {
            ds: {
                k: v
                for k, v in info.items()
                if k
                in (
                    "model",
                    "train_examples",
                    "val_examples",
                    "test_examples",
                    "steps_per_epoch",
                    "k_steps",
                    "depths",
                )
            }
            for ds, info in infos.items()
        },  # fmt: skip
        "mlp": f"MLP(features={MLP_FEATURES}) + head: 4 Dense depths",
        "cnn": f"ConvNet: Conv({CNN_FEATURES[0]})-pool-Conv({CNN_FEATURES[1]})-pool-flatten-"
        f"Dense({CNN_DENSE})-head, 4 depths",
        "base": f"chain(add_decayed_weights({WEIGHT_DECAY}), sgd(cosine({LEARNING_RATE}), "
        f"momentum={MOMENTUM}))",
        "adam": f"adam(cosine({ADAM_LR}))",
        "lerac": f"lerac(base, depth labels, k={K_EPOCHS} epochs of steps, "
        f"initial_scales={SCALES})",
        "staircase": "mode='staircase', c=10, steps_per_tick=steps per epoch (k = 3 epochs)",
        "batch_size": BATCH_SIZE,
        "epochs": epochs,
        "mlp_seeds": mlp_seeds,
        "cnn_seeds": cnn_seeds,
        "mlp_arms": list(mlp_arms),
        "cnn_arms": list(CNN_ARMS),
        "seeds_vmapped": "MLP sets: all seeds at once under jax.vmap; CNN: seed-major",
        "arm_times_s": {
            ds: {
                arm: {"compile": r["compile_time_s"], "train": r["train_time_s"]}
                for arm, r in info["raw"].items()
            }
            for ds, info in infos.items()
        },  # fmt: skip
    }
    harness.write_results(
        NAME,
        args=args,
        config=config,
        runs=runs,
        summary=summary,
        claim_md=CLAIM,
        table_md=table(summary, infos, epochs),
        plot=make_plot(infos, epochs),
        argv=argv,
    )
    logger.info("summary: %s", {k: v for k, v in summary.items() if "delta" in k or "ratio" in k})
    return summary


if __name__ == "__main__":
    main()
