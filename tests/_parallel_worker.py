"""Worker of ``tests/test_parallel.py``: one data-parallel run against one single-device run.

Run in a subprocess whose environment already holds
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before jax is imported, so the
parent test process keeps its single device). For every case (one per public transformation
of ``optax_multirate.TRANSFORMATIONS``, plus one with params sharded where a user asks), it
trains a tiny CNN for several steps that cross phase changes, twice, from the same init and
the same batches:

* on one device (plain arrays), and
* on ``parallel.data_mesh()`` of all 8 devices, the batch sharded over them
  (``parallel.shard_batch``), params, model state and optimizer state replicated
  (``parallel.place``),

with the library's own host-dispatch train step (``make_train_step`` / ``PhasedStep``), and
prints one JSON object: per case the largest absolute difference of params, optimizer state
and model state (batch statistics), the masks each run used, step by step, the number of
step programs compiled and of XLA backend compiles seen during the steps, the devices and
partition specs of the state, and whether an orbax checkpoint of the 8-device state restores
bitwise with its shardings. With no case named (or the case ``fit``) it also compares
``train.fit`` with a data-parallel step (``make_train_step(..., mesh=)``) with ``fit`` on one
device.

Usage: ``python tests/_parallel_worker.py [CASE ...]`` (default: every case and ``fit``).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

import optax_multirate as om
from optax_multirate import parallel
from optax_multirate.data import Split
from optax_multirate.models import CNN

NUM_DEVICES = 8
BATCH = 32  # 4 examples per device
STEPS = 8
CLASSES = 4
SHAPE = (8, 8, 1)
LR = 0.05

# ------------------------------------------------------------------------------ data, model


def _data(steps: int) -> list[dict[str, np.ndarray]]:
    """``steps`` fixed batches of 8x8 images; the label is a fixed function of the image."""
    rng = np.random.default_rng(0)
    x = rng.random((steps * BATCH, *SHAPE)).astype(np.float32)
    proj = rng.normal(size=(int(np.prod(SHAPE)), CLASSES)).astype(np.float32)
    y = np.argmax(x.reshape(len(x), -1) @ proj, -1).astype(np.int32)
    return [{"x": x[i::steps], "y": y[i::steps]} for i in range(steps)]


@functools.cache
def _init(model: CNN) -> tuple[Any, Any]:
    """The model's initial (params, model_state), the same for both runs of a case."""
    return om.init_model(model, jax.random.PRNGKey(0), np.zeros((1, *SHAPE), np.float32))


def _cnn(features: tuple[int, ...] = (4, 8), batch_norm: bool = False) -> CNN:
    return CNN(features=features, pool_after=(0,), num_classes=CLASSES, batch_norm=batch_norm)


def _head_body(params: Any, fast: str = "head", slow: str = "body") -> Any:
    return om.rule_labels(params, {fast: "^head/"}, default=slow)


def _fast_slow(params: Any) -> Any:
    return _head_body(params, "fast", "slow")


def _depths(params: Any) -> Any:
    """LeRaC depth units of the tiny CNN: conv 0 (+ its norm), conv 1 (+ its norm), head."""
    unit = {"Conv_0": 0, "BatchNorm_0": 0, "Conv_1": 1, "BatchNorm_1": 1, "head": 2}
    return jax.tree_util.tree_map_with_path(lambda p, _: unit[p[0].key], params)


# ------------------------------------------------------------------------------------ cases


def _accuracy(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """WUS's signal: the batch accuracy (on a mesh, the global-batch mean)."""
    return {"value": metrics["accuracy"]}


def _subgroups_step(model: CNN, tx: optax.GradientTransformation) -> om.PhasedStep:
    """A step whose forward pass switches off the slow entries (:func:`apply_slow_mask`)."""
    loss = om.classification_loss(model)

    def loss_fn(params, mask_state, model_state, batch, rng):
        return loss(om.apply_slow_mask(params, mask_state), model_state, batch, rng)

    return om.PhasedStep(loss_fn, tx, has_aux=True)


# name -> (model, tx factory, extras). ``extras``: "value" passes the batch
# accuracy as ``value=``; "subgroups" uses the masked forward pass; "grow" grows the widths
# (4, 8) -> (8, 12) after half the steps; "shard" shards Conv_1's kernel over the devices
# (``parallel.param_shardings``) and feeds the batch as hosts do (``shard_local_batch``).
CASES: dict[str, tuple[CNN, Callable[[], optax.GradientTransformation], tuple[str, ...]]] = {
    "freeze_schedule": (
        _cnn(batch_norm=True),
        lambda: om.freeze_schedule(optax.sgd(LR, momentum=0.9), _head_body, {"body": (0, 3)}),
        (),
    ),
    "multirate": (
        _cnn(),
        lambda: om.multirate(optax.sgd(LR, momentum=0.9), optax.adam(1e-3), 3, _fast_slow),
        (),
    ),
    "multirate_sgd": (_cnn(batch_norm=True), lambda: om.multirate_sgd(LR, 3, _fast_slow), ()),
    "multirate_subgroups": (
        _cnn(),
        lambda: om.multirate_subgroups(LR, 2, 0.5, seed=0, momentum=0.9),
        ("subgroups",),
    ),
    "multirate_timescales": (_cnn(), lambda: om.multirate_timescales(LR, (1, 2)), ()),
    "wus": (
        _cnn(),
        lambda: om.wus(
            optax.sgd(LR, momentum=0.9),
            om.wus_labels,
            threshold=0.0,
            window=2,
            warmup=0,
            force_windows=(2,),
        ),
        ("value",),
    ),
    "scale_by_lerac": (
        _cnn(batch_norm=True),
        lambda: optax.chain(optax.sgd(LR, momentum=0.9), om.scale_by_lerac(_depths, k=4)),
        (),
    ),
    "lerac": (_cnn(), lambda: om.lerac(optax.adam(1e-3), _depths, k=4), ()),
    "two_regimes": (
        _cnn(batch_norm=True),
        lambda: om.two_regimes(optax.sgd(LR, momentum=0.9), optax.adam(1e-3), switch_step=3),
        (),
    ),
    "two_regimes_sgd": (
        _cnn(),
        lambda: om.two_regimes_sgd(LR, total_steps=STEPS, large_fraction=0.5),
        (),
    ),
    "growth_lr_adaptation": (
        _cnn((4, 8), batch_norm=True),
        lambda: optax.chain(optax.sgd(LR, momentum=0.9), om.growth_lr_adaptation(2)),
        ("grow",),
    ),
    "multirate_sgd_sharded_params": (
        _cnn(),
        lambda: om.multirate_sgd(LR, 3, _fast_slow),
        ("shard",),
    ),
}

GROWN = (8, 12)


# -------------------------------------------------------------------------------- one run


class _CompileCounter:
    """Counts XLA backend compiles (``jax.monitoring``) while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0

    def register(self) -> None:
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COUNTER = _CompileCounter()


def run(name: str, mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    """Trains case ``name`` for ``STEPS`` steps on ``mesh`` (None: one device)."""
    model, make_tx, extras = CASES[name]
    data = _data(STEPS)
    params, model_state = _init(model)
    tx = make_tx()
    if mesh is not None:  # place, init, place: user shardings kept, moments follow them
        if "shard" in extras:
            spec = PartitionSpec(None, None, None, parallel.DATA_AXIS)  # output channels
            shardings = parallel.param_shardings(params, mesh, {"^Conv_1/kernel$": spec})
            params = jax.device_put(params, shardings)
        params, model_state = parallel.place((params, model_state), mesh)
    # Moments made by zeros_like keep the params' shardings; place replicates the rest.
    opt_state = tx.init(params)
    opt_state = parallel.place(opt_state, mesh) if mesh is not None else opt_state
    template = (params, opt_state)  # a fresh, placed restore target

    def make_step(m: CNN):
        if "subgroups" in extras:
            return _subgroups_step(m, tx), "raw"
        fn = _accuracy if "value" in extras else None
        return om.make_train_step(m, tx, extra_args_fn=fn).phased, "train"

    step, kind = make_step(model)
    steps_used = [step]
    masks, compiles = [], 0
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(1), STEPS))
    batch_devices = 0
    for t in range(STEPS):
        if "grow" in extras and t == STEPS // 2:
            compiles += step.num_compiles
            model, (params, model_state, opt_state) = _grow(
                model, tx, params, model_state, opt_state, mesh
            )
            step, kind = make_step(model)
            steps_used.append(step)
        batch = data[t]
        if mesh is not None:  # as each host feeds its own slice (one process: all of it)
            feed = parallel.shard_local_batch if "shard" in extras else parallel.shard_batch
            batch = feed(batch, mesh)
            batch_devices = len(jax.tree.leaves(batch)[0].sharding.device_set)
        args = (opt_state,) if kind == "raw" else ()
        COUNTER.active = True
        out = step(params, opt_state, *args, model_state, batch, keys[t])
        jax.block_until_ready(out)
        COUNTER.active = False
        params, opt_state = out.params, out.opt_state
        model_state = out.aux[0]
        masks.append("".join("1" if m else "0" for m in step.last_mask))
    compiles += step.num_compiles
    devices = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(params)})
    checkpoint = _checkpoint_round_trip((params, opt_state), template) if mesh else None
    return {
        "checkpoint": checkpoint,
        "params": jax.device_get(params),
        "opt_state": jax.device_get(opt_state),
        "model_state": jax.device_get(model_state),
        "masks": masks,
        "compiles": compiles,
        "distinct_masks": sum(len(s.masks) for s in steps_used),
        "param_devices": devices,
        "batch_devices": batch_devices,
        "shardings": _specs(params),
        "opt_state_shardings": _specs(opt_state),
    }


def _specs(tree: Any) -> list[str]:
    """The distinct partition specs of a tree's arrays ("single device" off a mesh)."""
    return sorted(
        {str(getattr(x.sharding, "spec", "single device")) for x in jax.tree.leaves(tree)}
    )


def _checkpoint_round_trip(state: Any, template: Any) -> dict[str, bool] | None:
    """Saves ``state`` with the train module's orbax helper and restores it into ``template``.

    Returns whether the restore is bitwise and keeps the target's shardings (None when the
    shapes changed during the run, as after a growth).
    """
    shapes = lambda t: [np.shape(x) for x in jax.tree.leaves(t)]  # noqa: E731
    if shapes(state) != shapes(template):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "ckpt"
        om.save_checkpoint(path, state)
        back = om.restore_checkpoint(path, template)
    pairs = list(zip(jax.tree.leaves(state), jax.tree.leaves(back)))
    return {
        "bitwise": all(np.array_equal(a, b) for a, b in pairs),
        "shardings_kept": all(a.sharding == b.sharding for a, b in pairs),
    }


def _grow(model, tx, params, model_state, opt_state, mesh):
    """Grows (4, 8) -> (8, 12) with :func:`optax_multirate.grow`, then places the result."""
    nxt = _cnn(GROWN, batch_norm=model.batch_norm)
    x = jnp.zeros((1, *SHAPE), jnp.float32)
    shapes = jax.eval_shape(functools.partial(nxt.init, train=False), jax.random.PRNGKey(0), x)
    variables, opt_state = om.grow(
        {"params": params, **model_state},
        opt_state,
        0,
        key=jax.random.PRNGKey(7),
        next_shapes=shapes,
        optimizer=tx,
        num_stages=2,
    )
    params = variables.pop("params")
    state = (params, variables, opt_state)
    return nxt, state if mesh is None else parallel.place(state, mesh)


def _max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference of the float leaves (NaN in both counts as equal)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        return math.inf
    worst = 0.0
    for u, v in zip(la, lb):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if u.shape != v.shape:
            return math.inf
        both_nan = np.isnan(u) & np.isnan(v)
        d = np.where(both_nan, 0.0, np.abs(u - v))
        worst = max(worst, float(np.max(d, initial=0.0)) if not np.isnan(d).any() else math.inf)
    return worst


def fit_case(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """``train.fit`` with a step on ``mesh`` against ``fit`` with a step on one device."""
    data = _data(STEPS)
    x = np.concatenate([b["x"] for b in data])
    y = np.concatenate([b["y"] for b in data])
    train = Split(x=x, y=y)
    model, make_tx, _ = CASES["wus"]
    kw = dict(epochs=2, batch_size=BATCH, seed=0)
    tx = make_tx()
    one = om.fit(model, tx, train, step=om.make_train_step(model, tx, extra_args_fn=_accuracy),
                 **kw)  # fmt: skip
    step = om.make_train_step(model, tx, extra_args_fn=_accuracy, mesh=mesh)
    many = om.fit(model, tx, train, step=step, **kw)
    return {
        "max_param_diff": _max_diff(jax.device_get(one.params), jax.device_get(many.params)),
        "masks_1": sorted(one.masks),
        "masks_8": sorted(many.masks),
        "compiles_1": one.num_compiles,
        "compiles_8": many.num_compiles,
        "param_devices_8": sorted(
            {len(x.sharding.device_set) for x in jax.tree.leaves(many.params)}
        ),
    }


def main(argv: list[str]) -> None:
    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(
            f"expected {NUM_DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{NUM_DEVICES}), got {jax.device_count()}"
        )
    names = [a for a in argv if a != "fit"] if argv else list(CASES)
    COUNTER.register()
    mesh = parallel.data_mesh()
    out: dict[str, Any] = {"num_devices": jax.device_count(), "cases": {}}
    for name in names:
        one = run(name, None)
        COUNTER.count = 0
        many = run(name, mesh)
        many_backend = COUNTER.count
        out["cases"][name] = {
            "max_param_diff": _max_diff(one["params"], many["params"]),
            "max_opt_state_diff": _max_diff(one["opt_state"], many["opt_state"]),
            "max_model_state_diff": _max_diff(one["model_state"], many["model_state"]),
            "masks_1": one["masks"],
            "masks_8": many["masks"],
            "compiles_1": one["compiles"],
            "compiles_8": many["compiles"],
            "backend_compiles_8": many_backend,
            "distinct_masks_1": one["distinct_masks"],
            "distinct_masks_8": many["distinct_masks"],
            "param_devices_1": one["param_devices"],
            "param_devices_8": many["param_devices"],
            "batch_devices_8": many["batch_devices"],
            "param_shardings_8": many["shardings"],
            "opt_state_shardings_8": many["opt_state_shardings"],
            "grows": "grow" in CASES[name][2],
            "checkpoint_8": many["checkpoint"],
        }
    if not argv or "fit" in argv:
        out["fit"] = fit_case(mesh)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
