"""What the phase protocol saves: FLOPs and step time of full, head-only and bias-only steps.

For the MLP, the CNN and the ResNet of the foundation, on MNIST-shaped batches of 128:

* the compiled FLOPs (XLA ``cost_analysis``) and the median wall time of the step program for
  the full gradient, the head-only gradient and the bias-only gradient (each a
  ``PhasedStep`` program: value_and_grad over the needed leaves, optimizer update, apply);
* the host-dispatch overhead: a phased step whose mask is "everything" (it finds the tags,
  reads the phase from the device and looks the program up) against the plain jitted step;
* the same phases under in-graph ``lax.switch`` dispatch, against host dispatch.

Timings are interleaved (round-robin over programs, many rounds) so that drift in the
machine's speed hits every program alike. Run: ``python -m benchmarks.step_cost``.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_multirate as om
from benchmarks import harness
from optax_multirate.models import CNN, MLP, ResNet
from optax_multirate.train import classification_loss, init_model

log = logging.getLogger(__name__)

CLAIM = (
    "DESIGN.md §3 measured, on this kind of machine, head-only and bias-only gradient costs "
    "of about 0.05-0.11 and 0.54-0.86 of a full step, and a convolution backward inside "
    "`lax.switch` about 80x slower than alone. Goal (issue 4): for the CNN and the ResNet, "
    "time ratio / FLOP ratio <= 1.1 for head-only and bias-only steps, and host-dispatch "
    "overhead <= 1.02."
)


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


def _time_calls(fns: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Round-robin timing: each round runs every fn ``per_round`` times; returns ms per call."""
    out = {k: [] for k in fns}
    for fn in fns.values():  # warm up (compiles happen here, not in the timings)
        jax.block_until_ready(fn())
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def measure(name: str, model, x: np.ndarray, y: np.ndarray, rounds: int, per_round: int) -> dict:
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
    fns["switch_full"] = lambda: switch(params, opt_state, *args)
    times = _time_calls(fns, rounds, per_round)
    med = {k: float(np.median(v)) for k, v in times.items()}
    row = {
        "model": name,
        "params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
        "flops": flops,
        "median_ms": med,
        "head_only_time_ratio": med["head_only"] / med["full"],
        "head_only_flop_ratio": flops["head_only"] / flops["full"],
        "bias_only_time_ratio": med["bias_only"] / med["full"],
        "bias_only_flop_ratio": flops["bias_only"] / flops["full"],
        "dispatch_overhead_ratio": med["host_all_true"] / med["plain"],
        # the same compiled program called directly: the cost of host dispatch alone
        "host_dispatch_only_ratio": med["host_all_true"] / med["full"],
        "switch_full_time_ratio": med["switch_full"] / med["full"],
        "compile_time_s": host.compile_time_s,
    }
    log.info("%s: %s", name, {k: v for k, v in row.items() if k.endswith("ratio")})
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = harness.parser("step_cost", __doc__)
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (round-robin)")
    args = ap.parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (2 if quick else 12)
    per_round = 2 if quick else 5
    rng = np.random.default_rng(0)
    x = rng.random((128, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 128).astype(np.int32)
    runs = []
    for name, model in _models(quick).items():
        runs.append(measure(name, model, x, y, rounds, per_round))
    by = {r["model"]: r for r in runs}
    keys = [
        "head_only_time_ratio",
        "head_only_flop_ratio",
        "bias_only_time_ratio",
        "bias_only_flop_ratio",
        "dispatch_overhead_ratio",
    ]
    summary = {}
    for prefix, model in (("", "cnn"), ("mlp_", "mlp"), ("resnet_", "resnet")):
        for k in keys:
            summary[prefix + k] = round(by[model][k], 4)
        summary[prefix + "switch_full_time_ratio"] = round(by[model]["switch_full_time_ratio"], 4)
        summary[prefix + "host_dispatch_only_ratio"] = round(
            by[model]["host_dispatch_only_ratio"], 4
        )
        summary[prefix + "full_step_ms"] = round(by[model]["median_ms"]["full"], 3)
    for prefix, model in (("", "cnn"), ("resnet_", "resnet")):
        for k in ("head_only", "bias_only"):
            r = by[model]
            summary[f"{prefix}{k}_time_over_flop_ratio"] = round(
                r[f"{k}_time_ratio"] / r[f"{k}_flop_ratio"], 4
            )
    lines = [
        "| model | params | full ms | head-only ms | bias-only ms | plain ms | host all-true ms "
        "| switch (full phase) ms | head-only time / FLOP ratio | bias-only time / FLOP ratio "
        "| dispatch overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m = r["median_ms"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {m['full']:.2f} | {m['head_only']:.2f} | "
            f"{m['bias_only']:.2f} | {m['plain']:.2f} | {m['host_all_true']:.2f} | "
            f"{m['switch_full']:.2f} | {r['head_only_time_ratio']:.3f} / "
            f"{r['head_only_flop_ratio']:.3f} | {r['bias_only_time_ratio']:.3f} / "
            f"{r['bias_only_flop_ratio']:.3f} | {r['dispatch_overhead_ratio']:.3f} |"
        )
    config = {
        "batch_size": 128,
        "input_shape": [28, 28, 1],
        "optimizer": "sgd(0.01, momentum=0.9)",
        "rounds": rounds,
        "steps_per_round": per_round,
        "models": {k: repr(v) for k, v in _models(quick).items()},
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
    logging.basicConfig(level=logging.INFO)
    main()
