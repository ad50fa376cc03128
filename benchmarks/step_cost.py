"""What the phase protocol saves: FLOPs and step time of full, head-only and bias-only steps.

For the MLP, the CNN and the ResNet of ``optax_multirate.models``, on MNIST-shaped batches
of 128:

* the compiled FLOPs (XLA ``cost_analysis``) and the median wall time of the step program for
  the full gradient, the head-only gradient and the bias-only gradient (each a
  ``PhasedStep`` program: value_and_grad over the needed leaves, optimizer update, apply);
* the host-dispatch overhead: a phased step whose mask is "everything" (it finds the tags,
  reads the phase from the device and looks the program up) against the plain jitted step;
* the same phases under in-graph ``lax.switch`` dispatch, against host dispatch;
* Linen against Flax NNX: the CNN written in both APIs, multirate (k=5, the head fast)
  through the library's phased step, timed over whole cycles against each API's own plain
  step (Linen: the phased step with plain optax; NNX: ``nnx.Optimizer`` with ``optax.sgd``
  under ``nnx.jit``).

Timings are interleaved (round-robin over programs, many rounds) so that drift in the
machine's speed hits every program alike. Run: ``python -m benchmarks.step_cost``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_multirate as om
from benchmarks import harness
from optax_multirate.models import CNN, MLP, ResNet, max_pool_2x2
from optax_multirate.train import classification_loss, init_model, make_train_step

log = logging.getLogger(__name__)

CLAIM = (
    "No paper: the claim is the phase protocol's premise. Timed by hand on XLA CPU (2 cores), "
    "head-only and bias-only gradients cost about 0.05-0.11 and 0.54-0.86 of a full step, "
    "depending on the model, and a convolution backward inside `lax.switch` runs about 80x "
    "slower than the same program alone. Our goal: for the CNN and the ResNet, time ratio / "
    "FLOP ratio <= 1.1 for head-only and bias-only steps, and host-dispatch overhead <= 1.02. "
    "For Flax NNX, multirate (k=5) through the library's phased step costs, against a plain "
    "`nnx.Optimizer` step, at most what it costs a Linen model against a plain Linen step, "
    "plus 0.05."
)

#: multirate's period in the Linen-vs-NNX figure: one full step, then k - 1 fast-only ones
CYCLE = 5


def _models(quick: bool):
    if quick:
        return {
            "mlp": MLP(features=(32, 32)),
            "cnn": CNN(features=(8, 16)),
            "resnet": ResNet(stage_features=(8, 8, 16), blocks_per_stage=(1, 1, 1)),
        }
    return {
        "mlp": MLP(features=(256, 256)),
        "cnn": CNN(features=(32, 64)),
        "resnet": ResNet(stage_features=(16, 32, 64), blocks_per_stage=(1, 1, 1)),
    }


def _time_rounds(
    fns: dict, rounds: int, *, every: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, list[float]]:
    """Round-robin timing: each round calls every fn once, in a fresh random order.

    Returns ms per call per round; ``every={name: n}`` times ``name`` only every n-th round
    (nan in the others), for programs too slow to time in every round. Ratios are taken per
    round (:func:`harness.paired_ratio`), so drift in the machine's speed cancels.
    """
    every = dict(every or {})
    out = {k: [] for k in fns}
    for fn in fns.values():  # warm up (compiles happen here, not in the timings)
        jax.block_until_ready(fn())
    order = np.random.default_rng(seed)
    names = list(fns)
    for r in range(rounds):
        for name in order.permutation(names):
            if r % every.get(name, 1):
                out[name].append(float("nan"))
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]())
            out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def _chained(step, params, opt_state, args, n: int):
    """``n`` steps threaded through params and state, blocked once at the end (the training
    loop's shape: a plain jitted step may run ahead, a phased one reads its phases each step).
    Timed per call of the returned function; the figure is divided by ``n``."""

    def run():
        p, s = params, opt_state
        for _ in range(n):
            out = step(p, s, *args)
            p, s = out.params, out.opt_state
        return p

    return run


# (summary key, numerator arm, denominator arm)
RATIOS = (
    ("head_only_time_ratio", "head_only", "full"),
    ("bias_only_time_ratio", "bias_only", "full"),
    ("dispatch_overhead_ratio", "host_all_true", "plain"),
    ("loop_dispatch_overhead_ratio", "host_loop", "plain_loop"),
    ("host_dispatch_only_ratio", "host_all_true", "full"),
    ("switch_full_time_ratio", "switch_full", "full"),
)


def measure(name: str, model, x: np.ndarray, y: np.ndarray, rounds: int, loop_steps: int) -> dict:
    rng = jax.random.key(0)
    params, model_state = init_model(model, rng, x[:1])
    loss = classification_loss(model)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    args = (model_state, batch, rng)
    paths = om.labels.leaf_paths(params)
    head = om.rule_labels(params, {"head": "^head/"}, default="body")
    wb = om.weight_bias_labels(params)
    masks = {
        "full": (True,) * len(paths),
        "head_only": tuple(p.startswith("head/") for p in paths),
        "bias_only": tuple(lab == "bias" for lab in jax.tree.leaves(wb)),
    }
    # One phased optimizer whose segments are: full, head-only, bias-only (steps far away,
    # so the timed state stays in the full phase; each mask's program is timed directly).
    kind = jax.tree.map(lambda h, w: f"{h}-{w}", head, wb)
    intervals = {
        "body-weight": (10**6, 3 * 10**6),
        "body-bias": (10**6, 2 * 10**6),
        "head-weight": (2 * 10**6, 3 * 10**6),
    }
    present = set(jax.tree.leaves(kind))
    sgd = optax.sgd(0.01, momentum=0.9)
    tx = om.freeze_schedule(sgd, kind, {k: v for k, v in intervals.items() if k in present})
    opt_state = tx.init(params)
    host = om.PhasedStep(loss, tx, has_aux=True)
    plain_state = sgd.init(params)
    plain = om.PhasedStep(loss, sgd, has_aux=True, dispatch="full")
    switch = om.PhasedStep(loss, tx, has_aux=True, dispatch="switch")

    # FLOPs of each mask's program (same optimizer, so only the gradient work differs).
    flops = {k: host.flops(m, params, opt_state, *args) for k, m in masks.items()}
    progs = {k: host.program(m) for k, m in masks.items()}
    fns = {f"{k}": (lambda p=prog: p(params, opt_state, args, {})) for k, prog in progs.items()}
    fns["plain"] = lambda: plain(params, plain_state, *args)
    fns["host_all_true"] = lambda: host(params, opt_state, *args)
    fns["plain_loop"] = _chained(plain, params, plain_state, args, loop_steps)
    fns["host_loop"] = _chained(host, params, opt_state, args, loop_steps)
    fns["switch_full"] = lambda: switch(params, opt_state, *args)
    # the switch program is many times slower on XLA CPU: timed every 4th round
    times = _time_rounds(fns, rounds, every={"switch_full": 4})
    for k in ("plain_loop", "host_loop"):
        times[k] = [t / loop_steps for t in times[k]]
    med = {k: harness.median_ms(t for t in v if not np.isnan(t)) for k, v in times.items()}
    row = {
        "model": name,
        "params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
        "flops": flops,
        "median_ms": med,
        "times_ms": times,
        "head_only_flop_ratio": flops["head_only"] / flops["full"],
        "bias_only_flop_ratio": flops["bias_only"] / flops["full"],
        "compile_time_s": host.compile_time_s,
    }
    for key, a, b in RATIOS:
        row[key], row[key + "_ci_low"], row[key + "_ci_high"] = harness.paired_ratio(
            times[a], times[b]
        )
    log.info("%s: %s", name, {k: v for k, v in row.items() if k.endswith("ratio")})
    return row


class NNXCNN(nnx.Module):
    """The CNN of ``optax_multirate.models.CNN(features)`` written in Flax NNX.

    The same layers in the same order (3x3 ``SAME`` convolutions with bias, each followed by
    relu and :func:`~optax_multirate.models.max_pool_2x2`, a global mean, a ``head``), so
    with the same params it computes the same logits.
    """

    def __init__(self, features, num_classes: int = 10, *, rngs: nnx.Rngs):
        widths = (1, *features)
        self.convs = nnx.List(
            [nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs) for a, b in zip(widths, widths[1:])]
        )
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        for conv in self.convs:
            x = max_pool_2x2(nnx.relu(conv(x)))
        return self.head(x.mean((1, 2)))


def _cycles(step, params, opt_state, model_state, batch, rng, n: int):
    """``n`` chained steps of a :class:`~optax_multirate.train.TrainStep` from the same state
    each call (a cycle start), blocked once at the end."""

    def run():
        p, o, s = params, opt_state, model_state
        for _ in range(n):
            p, o, s, _ = step(p, o, s, batch, rng)
        return p

    return run


def measure_apis(features, x: np.ndarray, y: np.ndarray, rounds: int, k: int = CYCLE) -> dict:
    """Multirate (k steps: one full, k - 1 head-only) over each API's plain step, Linen and NNX.

    Each arm runs one whole cycle of ``k`` chained steps per round (the figure is per step):
    Linen's multirate and plain steps are the library's phased step (plain: ``optax.sgd``,
    full gradient); NNX's multirate step is the library's phased step on the module's split,
    its plain step ``nnx.Optimizer(model, optax.sgd(...), wrt=nnx.Param)`` under ``nnx.jit``.
    All four compute the loss and accuracy of the same batch.
    """
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    rng = jax.random.key(0)
    sgd = lambda: optax.sgd(0.01, momentum=0.9)
    fast_head = {"fast": "^head/"}

    linen = CNN(features=tuple(features))
    params, model_state = init_model(linen, rng, x[:1])
    tx = om.multirate_sgd(0.01, k, om.rule_labels(params, fast_head, default="slow"))
    linen_mr = make_train_step(linen, tx)
    linen_plain = make_train_step(linen, sgd(), dispatch="full")

    module = NNXCNN(tuple(features), rngs=nnx.Rngs(0))
    n_params, n_state = init_model(module)
    labels = om.rule_labels(nnx.state(module, nnx.Param), fast_head, default="slow")
    n_tx = om.multirate_sgd(0.01, k, labels)
    nnx_mr = make_train_step(module, n_tx)
    plain_model = NNXCNN(tuple(features), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(plain_model, sgd(), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == y)

        (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, accuracy

    def nnx_plain():
        for _ in range(k):
            out = nnx_step(plain_model, optimizer, batch["x"], batch["y"])
        return out

    fns = {
        "linen_multirate": _cycles(linen_mr, params, tx.init(params), model_state, batch, rng, k),
        "linen_plain": _cycles(linen_plain, params, sgd().init(params), model_state, batch, rng, k),
        "nnx_multirate": _cycles(nnx_mr, n_params, n_tx.init(n_params), n_state, batch, rng, k),
        "nnx_plain": nnx_plain,
    }
    times = {name: [t / k for t in ts] for name, ts in _time_rounds(fns, rounds).items()}
    row = {
        "model": "cnn",
        "k": k,
        "median_ms": {name: harness.median_ms(ts) for name, ts in times.items()},
        "times_ms": times,
        "masks": {
            "linen": [om.train.mask_name(m) for m in linen_mr.phased.masks],
            "nnx": [om.train.mask_name(m) for m in nnx_mr.phased.masks],
        },
    }
    for api in ("linen", "nnx"):
        key = f"{api}_multirate_step_time_ratio"
        row[key], row[key + "_ci_low"], row[key + "_ci_high"] = harness.paired_ratio(
            times[f"{api}_multirate"], times[f"{api}_plain"]
        )
    log.info("linen vs nnx: %s", {k: v for k, v in row.items() if k.endswith("ratio")})
    return row


def main(argv: list[str] | None = None) -> dict:
    def flags(p):
        p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 60)")
        p.add_argument("--loop-steps", type=int, default=None, help="steps per chained call")
        p.add_argument(
            "--models", default="mlp,cnn,resnet", help="comma-separated subset of mlp,cnn,resnet"
        )

    args, _ = harness.start("step_cost", __doc__, argv, full_seeds=1, add_flags=flags)
    quick = args.quick
    rounds = args.rounds or (2 if quick else 60)
    loop_steps = args.loop_steps or (2 if quick else 4)
    rng = np.random.default_rng(0)
    x = rng.random((128, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 128).astype(np.int32)
    runs = []
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    if not chosen or set(chosen) - set(_models(quick)):
        raise ValueError(f"--models must name some of mlp, cnn, resnet, got {args.models!r}")
    for name, model in _models(quick).items():
        if name in chosen:
            runs.append(measure(name, model, x, y, rounds, loop_steps))
    apis = None
    if "cnn" in chosen:
        apis = measure_apis(_models(quick)["cnn"].features, x, y, rounds)
    by = {r["model"]: r for r in runs}
    summary: dict = {}
    for prefix, model in (("", "cnn"), ("mlp_", "mlp"), ("resnet_", "resnet")):
        if model not in by:
            continue
        r = by[model]
        for key, _, _ in RATIOS:
            for suffix in ("", "_ci_low", "_ci_high"):
                summary[prefix + key + suffix] = round(r[key + suffix], 4)
        for k in ("head_only", "bias_only"):
            summary[f"{prefix}{k}_flop_ratio"] = round(r[f"{k}_flop_ratio"], 4)
        summary[prefix + "full_step_ms"] = round(r["median_ms"]["full"], 3)
    for prefix, model in (("", "cnn"), ("resnet_", "resnet")):
        if model not in by:
            continue
        r = by[model]
        for k in ("head_only", "bias_only"):
            for suffix in ("", "_ci_low", "_ci_high"):
                summary[f"{prefix}{k}_time_over_flop_ratio{suffix}"] = round(
                    r[f"{k}_time_ratio{suffix}"] / r[f"{k}_flop_ratio"], 4
                )
        # the goal of CLAIM, on the point estimates
        summary[f"{prefix}goal_met"] = bool(
            r["head_only_time_ratio"] / r["head_only_flop_ratio"] <= 1.1
            and r["bias_only_time_ratio"] / r["bias_only_flop_ratio"] <= 1.1
            and r["dispatch_overhead_ratio"] <= 1.02
        )

    if apis is not None:
        for api in ("linen", "nnx"):
            key = f"{api}_multirate_step_time_ratio"
            for suffix in ("", "_ci_low", "_ci_high"):
                summary[key + suffix] = round(apis[key + suffix], 4)
            summary[f"{api}_plain_step_ms"] = round(apis["median_ms"][f"{api}_plain"], 3)
        summary["nnx_goal_met"] = bool(
            apis["nnx_multirate_step_time_ratio"] <= apis["linen_multirate_step_time_ratio"] + 0.05
        )

    def ci(r, key):
        return f"{r[key]:.3f} [{r[key + '_ci_low']:.3f}, {r[key + '_ci_high']:.3f}]"

    lines = [
        "Medians of per-round paired ratios, 95% order-statistic interval in brackets.",
        "",
        "| model | params | full ms | head-only ms | bias-only ms | plain ms "
        "| head-only time / FLOP ratio | bias-only time / FLOP ratio | dispatch overhead "
        "| dispatch overhead, chained loop | switch / host (full phase) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m = r["median_ms"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {m['full']:.2f} | {m['head_only']:.2f} | "
            f"{m['bias_only']:.2f} | {m['plain']:.2f} | "
            f"{ci(r, 'head_only_time_ratio')} / {r['head_only_flop_ratio']:.3f} | "
            f"{ci(r, 'bias_only_time_ratio')} / {r['bias_only_flop_ratio']:.3f} | "
            f"{ci(r, 'dispatch_overhead_ratio')} | {ci(r, 'loop_dispatch_overhead_ratio')} | "
            f"{r['switch_full_time_ratio']:.2f} |"
        )
    if apis is not None:
        m = apis["median_ms"]
        lines += [
            "",
            f"Linen against NNX, the CNN: multirate (k={apis['k']}, head fast) through the "
            "library's phased step, per step over whole cycles, against each API's plain step.",
            "",
            "| API | multirate ms | plain ms | multirate / plain | masks |",
            "|---|---|---|---|---|",
        ]
        for api, plain in (("linen", "phased step, plain optax"), ("nnx", "nnx.Optimizer")):
            lines.append(
                f"| {api} | {m[api + '_multirate']:.2f} | {m[api + '_plain']:.2f} ({plain}) | "
                f"{ci(apis, api + '_multirate_step_time_ratio')} | "
                f"{', '.join(apis['masks'][api])} |"
            )
        runs.append(apis | {"model": "cnn_linen_vs_nnx"})
    config = {
        "batch_size": 128,
        "input_shape": [28, 28, 1],
        "optimizer": "sgd(0.01, momentum=0.9)",
        "rounds": rounds,
        "timing": "each round calls every program once in a random order (the switch program "
        "every 4th round); ratios are medians of per-round ratios",
        "loop_steps": loop_steps,
        "models": {k: repr(v) for k, v in _models(quick).items()},
        "linen_vs_nnx": f"CNN(features) and NNXCNN(features): multirate_sgd(0.01, k={CYCLE}, "
        "head fast) through make_train_step, per step over whole cycles (one round = one "
        "cycle per arm), against make_train_step(cnn, sgd, dispatch='full') (Linen) and "
        "nnx.Optimizer(model, sgd, wrt=nnx.Param) under nnx.jit (NNX)",
    }
    harness.write_results(
        "step_cost",
        args=args,
        config=config,
        runs=runs,
        summary=summary,
        claim_md=CLAIM,
        table_md="\n".join(lines),
    )
    return summary


if __name__ == "__main__":
    harness.setup_logging()
    main()
