"""A whole grown training: train each stage, grow, continue (:func:`fit_grown`)."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_multirate import train as train_lib
from optax_multirate.data import Split, batches, num_batches
from optax_multirate.growing.schedule import GrowthSchedule
from optax_multirate.growing.widen import grow

__all__ = ["GrownFitResult", "fit_grown"]


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(model: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


@dataclasses.dataclass
class GrownFitResult:
    """What :func:`fit_grown` returns.

    Attributes:
      params: final params (full width).
      model_state: final mutable collections (batch statistics).
      opt_state: final optimizer state.
      history: one dict per epoch: ``epoch`` (1-based), ``stage``, ``step``, ``train_time_s``
        (cumulative; growth included, compiles and evaluation excluded), ``train_loss``,
        ``train_accuracy``, ``test_loss``, ``test_accuracy``, and ``lra_ratios`` (list of
        ``r_t``) when the optimizer holds a :func:`growth_lr_adaptation` state.
      growths: one dict per growth: ``stage`` (the new stage), ``epoch``, ``step``,
        ``train_time_s``, ``grow_time_s``, ``max_logit_change`` (max absolute change of
        eval-mode logits on a probe batch) and ``max_logit``.
      final_accuracy: test accuracy after the last epoch.
      train_time_s: total train time (growth included, compiles and evaluation excluded).
      compile_time_s: time this call spent compiling step programs.
      num_compiles: step programs this call compiled, per stage.
      steps_per_stage: steps run in each stage.
      step_times_ms: per-stage lists of step wall times (compiling steps left out).
      flops_per_step: compiled FLOPs of one step per stage (``measure_flops=True``), else [].
    """

    params: Any
    model_state: Any
    opt_state: Any
    history: list[dict[str, Any]]
    growths: list[dict[str, float]]
    final_accuracy: float
    train_time_s: float
    compile_time_s: float
    num_compiles: list[int]
    steps_per_stage: list[int]
    step_times_ms: list[list[float]]
    flops_per_step: list[float]

    @property
    def flops(self) -> float:
        """Total training FLOPs: ``sum_t flops_per_step[t] * steps_per_stage[t]``."""
        return float(sum(f * n for f, n in zip(self.flops_per_step, self.steps_per_stage)))


def fit_grown(
    model_fn: Callable[[tuple[int, ...]], nn.Module],
    tx: optax.GradientTransformation,
    train: Split,
    test: Split,
    schedule: GrowthSchedule,
    *,
    batch_size: int,
    seed: int,
    grow_kwargs: dict[str, Any] | None = None,
    dispatch: str = "host",
    measure_flops: bool = False,
    probe_size: int = 256,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    step_cache: dict[Any, Any] | None = None,
) -> GrownFitResult:
    """Runs a whole grown training: each stage trains, then :func:`grow` maps to the next.

    Epoch ``e`` (counted over the whole run) visits ``batches(train, batch_size, seed=seed,
    epoch=e)``, the batches :func:`optax_multirate.train.fit` uses, so a fixed-width run
    (a one-stage schedule, ``m0=1``) sees the same data. Each stage builds its own
    :func:`~optax_multirate.train.make_train_step` (one compilation per stage); the optimizer
    state carries over through ``grow``, so schedules continue across stages.

    Args:
      model_fn: ``widths -> Flax model`` (e.g. ``lambda w: CNN(features=w, batch_norm=True)``).
      tx: the optimizer (e.g. a chain ending with :func:`growth_lr_adaptation`).
      train: training split.
      test: test split, evaluated after every epoch.
      schedule: the stages' widths and epochs.
      batch_size: examples per step.
      seed: seeds the init, the batch order, dropout and the growth draws.
      grow_kwargs: keyword arguments for :func:`grow` (``exact``, ``rescale``, ``momentum``...).
      dispatch: see :class:`~optax_multirate.phases.PhasedStep`.
      measure_flops: record the compiled FLOPs of each stage's step.
      probe_size: test examples whose logits are compared across each growth.
      on_epoch_end: ``callback(epoch, history_row)`` after each epoch's evaluation.
      step_cache: a dict kept by the caller to reuse the compiled train steps across calls
        with the same ``tx`` (e.g. the seeds of one benchmark arm), keyed by
        ``(stage model, tx, dispatch)``; ``num_compiles`` then counts this call's compiles.

    Returns:
      A :class:`GrownFitResult`.

    Raises:
      ValueError: for a ``batch_size`` out of range, or what :func:`grow` raises.

    Examples:
      >>> import numpy as np, optax
      >>> from optax_multirate.data import Split
      >>> from optax_multirate.models import MLP
      >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
      >>> split = Split(x=x, y=(x[:, 0] > 0).astype(np.int32))
      >>> sched = GrowthSchedule((8,), total_epochs=3, m0=0.5, p_c=1.0, t0=1)
      >>> res = fit_grown(lambda w: MLP(w, num_classes=2), optax.sgd(0.1), split, split,
      ...                 sched, batch_size=16, seed=0)
      >>> print(res.num_compiles, res.steps_per_stage, res.growths[0]["max_logit_change"] < 1e-5)
      [1, 1] [4, 8] True
    """
    num_batches(train, batch_size)  # validates batch_size before any work
    grow_kwargs = dict(grow_kwargs or {})
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x6E0)
    model = model_fn(schedule.widths[0])
    params, model_state = train_lib.init_model(model, jax.random.PRNGKey(seed), train.x[:1])
    opt_state = tx.init(params)
    probe = jnp.asarray(test.x[:probe_size])
    history: list[dict[str, Any]] = []
    growths: list[dict[str, float]] = []
    compiles, steps, times, flops = [], [], [], []
    train_time = compile_time = 0.0
    epoch = global_step = 0
    models = [model] + [model_fn(w) for w in schedule.widths[1:]]
    shapes = [  # the plan: each stage's variable shapes, traced once before training
        jax.eval_shape(functools.partial(m.init, train=False), jax.random.PRNGKey(0), probe[:1])
        for m in models
    ]
    for stage, stage_epochs in enumerate(schedule.epochs):
        if stage:
            before = _eval_logits(model, {"params": params, **model_state}, probe)
            t0 = time.perf_counter()
            variables, opt_state = grow(
                {"params": params, **model_state}, opt_state, stage - 1,
                key=jax.random.fold_in(key, stage), next_shapes=shapes[stage], optimizer=tx,
                num_stages=schedule.num_stages, **grow_kwargs,
            )  # fmt: skip
            params = variables.pop("params")
            model_state, model = variables, models[stage]
            jax.block_until_ready((params, opt_state))
            grow_time = time.perf_counter() - t0
            train_time += grow_time
            after = _eval_logits(model, {"params": params, **model_state}, probe)
            growths.append(
                {
                    "stage": stage,
                    "epoch": epoch,
                    "step": global_step,
                    "train_time_s": train_time,
                    "grow_time_s": grow_time,
                    "max_logit_change": float(jnp.max(jnp.abs(after - before))),
                    "max_logit": float(jnp.max(jnp.abs(before))),
                }
            )
        cache_key = (model, tx, dispatch)
        step_fn = None if step_cache is None else step_cache.get(cache_key)
        if step_fn is None:
            step_fn = train_lib.make_train_step(model, tx, dispatch=dispatch)
            if step_cache is not None:
                step_cache[cache_key] = step_fn
        n_before, t_before = step_fn.phased.num_compiles, step_fn.phased.compile_time_s
        if measure_flops:  # compiles this stage's first program (counted as the stage's)
            batch = next(iter(batches(train, batch_size, seed=seed, epoch=epoch)))
            mask = step_fn.phased.mask_for(params, opt_state)
            flops.append(
                step_fn.phased.flops(
                    mask, params, opt_state, model_state, batch, jax.random.PRNGKey(seed)
                )
            )

        def stage_row(e: int, res: train_lib.FitResult, stage=stage, step0=global_step,
                      time0=train_time) -> None:  # fmt: skip
            row: dict[str, Any] = {"stage": stage, **res.history[-1]}
            row["step"] += step0
            row["train_time_s"] += time0
            lra = optax.tree_utils.tree_get(res.opt_state, "ratios")
            if lra is not None:
                row["lra_ratios"] = [float(r) for r in np.ravel(lra)]
            history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(e, row)

        res = train_lib.fit(
            model, tx, train, test, epochs=stage_epochs, batch_size=batch_size, seed=seed,
            params=params, model_state=model_state, opt_state=opt_state, epoch_offset=epoch,
            train_step=step_fn, on_epoch_end=stage_row,
        )  # fmt: skip
        params, model_state, opt_state = res.params, res.model_state, res.opt_state
        epoch += stage_epochs
        global_step += res.steps
        train_time += res.train_time_s
        compiles.append(step_fn.phased.num_compiles - n_before)
        compile_time += step_fn.phased.compile_time_s - t_before
        steps.append(res.steps)
        times.append([t for ts in res.step_times_ms.values() for t in ts])
    return GrownFitResult(
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        history=history,
        growths=growths,
        final_accuracy=history[-1]["test_accuracy"] if history else float("nan"),
        train_time_s=train_time,
        compile_time_s=compile_time,
        num_compiles=compiles,
        steps_per_stage=steps,
        step_times_ms=times,
        flops_per_step=flops,
    )
