"""A whole grown training on the train loop: the :class:`GrowthStages` callback, :func:`fit_grown`.

:class:`GrowthStages` is a :class:`~optax_multirate.train.Callback`: at each stage boundary
of a :class:`GrowthSchedule` it grows the params, model state and optimizer state with
:func:`grow` and swaps the loop's model and train step for the next stage's.
:func:`fit_grown` is :func:`~optax_multirate.train.fit` with that callback and an evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optax_multirate import _checks
from optax_multirate import models as models_lib
from optax_multirate import train as train_lib
from optax_multirate.data import Split, batches
from optax_multirate.growing.generic import grow_module, grow_variables
from optax_multirate.growing.schedule import GrowthSchedule
from optax_multirate.growing.widen import grow
from optax_multirate.train import model as model_lib
from optax_multirate.train import nnx_support

__all__ = ["GrowthStages", "GrownFitResult", "fit_grown"]


#: The library's models, grown by :func:`grow`; any other model by :func:`grow_variables` or
#: :func:`grow_module` (which take these of ``grow_kwargs``).
_LIBRARY = (models_lib.MLP, models_lib.CNN, models_lib.ResNet)
_GENERIC_KWARGS = ("rescale", "momentum", "pairing", "bn_epsilon")


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(runner: Any, params: Any, model_state: Any, x: jax.Array) -> jax.Array:
    return runner.apply(params, model_state, x, train=False)[0]


class GrowthStages(train_lib.Callback):
    """Grows the model at the stage boundaries of ``schedule`` (a callback of ``fit``).

    The run starts with ``model_fn(schedule.widths[0])`` and the loop's step for it. Before
    the first epoch of stage ``s`` it grows ``(params, model_state, opt_state)`` to stage
    ``s``'s shapes (key ``fold_in(fold_in(PRNGKey(seed), 0x6E0), s)``, the optimizer given
    as ``loop.tx``): the library's models with :func:`grow`, any other Linen model with
    :func:`grow_variables` into ``model_fn``'s wider twin, an NNX model with
    :func:`grow_module` (the stage's module receives the grown values). It adds the growth's
    time to the train time, and sets
    ``loop.model`` and ``loop.step`` to stage ``s``'s (one step per stage model, kept in
    ``step_cache``, so each stage compiles once). It also writes ``stage`` (and
    ``lra_ratios`` when the optimizer holds a :func:`growth_lr_adaptation` state) into each
    epoch's row, and records per stage what :class:`GrownFitResult` reports.

    Args:
      model_fn: ``widths -> Flax model`` (Linen or NNX; any model whose wider twin has the
        same parameter tree).
      schedule: the stages' widths and epochs; ``fit``'s ``epochs`` should be
        ``schedule.total_epochs``.
      probe: inputs whose eval-mode logits are compared across each growth (and whose first
        example traces each stage's shapes).
      grow_kwargs: keyword arguments for :func:`grow` (for another model, those
        :func:`grow_variables` takes: ``rescale``, ``momentum``, ``pairing``, ``bn_epsilon``).
      dispatch: the dispatch of the steps it builds (see
        :class:`~optax_multirate.phases.PhasedStep`).
      step_cache: ``{(stage model, tx, dispatch, loss, call): TrainStep}`` to reuse compiled
        steps across runs (a fresh dict when None).
      flops_batch: ``epoch -> batch``; when given, the compiled FLOPs of each stage's step on
        the batch of its first epoch are recorded (compiling that stage's first program).
      loss: the loss of the steps it builds (see :func:`~optax_multirate.train.fit`).
      call: how the model is told train or eval mode (see :func:`~optax_multirate.train.fit`).

    Attributes:
      growths, num_compiles, steps_per_stage, step_times_ms, flops_per_step,
      compile_time_s: what :class:`GrownFitResult` reports, filled during the run.

    Raises:
      TypeError: for a bad ``loss`` or ``call``.
      ValueError: when the run does not start at epoch 0, for ``grow_kwargs`` that only
        :func:`grow` takes given for another model, or what the growth raises.
    """

    def __init__(
        self,
        model_fn: Callable[[tuple[int, ...]], nn.Module],
        schedule: GrowthSchedule,
        *,
        probe: jax.typing.ArrayLike,
        grow_kwargs: Mapping[str, Any] | None = None,
        dispatch: str = "host",
        step_cache: dict[Any, train_lib.TrainStep] | None = None,
        flops_batch: Callable[[int], Any] | None = None,
        loss: model_lib.Loss | None = None,
        call: model_lib.Call = "train",
    ):
        self.model_fn = _checks.check_callable("model_fn", model_fn)
        if not isinstance(schedule, GrowthSchedule):
            raise TypeError(f"schedule must be a GrowthSchedule, got {schedule!r}")
        self.schedule = schedule
        self.probe = jnp.asarray(probe)
        self.grow_kwargs = dict(grow_kwargs or {})
        self.dispatch = dispatch
        self.step_cache = {} if step_cache is None else step_cache
        self.flops_batch = _checks.check_callable("flops_batch", flops_batch, optional=True)
        self.loss, self.call = model_lib.check_loss(loss), model_lib.check_call(call)
        self.models = [model_fn(w) for w in schedule.widths]
        self.runners = [model_lib.flax_model(m, self.call) for m in self.models]
        self.starts = (0, *schedule.boundaries)  # first epoch of each stage

    def step_for(self, model: Any, tx: optax.GradientTransformation) -> train_lib.TrainStep:
        """The (cached) train step of one stage's model."""
        key = (model, tx, self.dispatch, self.loss, self.call)
        if key not in self.step_cache:
            self.step_cache[key] = train_lib.make_train_step(
                model, tx, dispatch=self.dispatch, loss=self.loss, call=self.call
            )
        return self.step_cache[key]

    def on_train_begin(self, loop: train_lib.Loop) -> None:
        if loop.state.epoch != 0:
            raise ValueError(f"GrowthStages starts a run at epoch 0, got {loop.state.epoch}")
        key, x = jax.random.PRNGKey(0), self.probe[:1]
        eval_kwargs = model_lib.call_kwargs(self.call, False)
        self.shapes = [  # each Linen stage's variable shapes, traced once before training
            None if nnx_support.is_nnx(m) else
            jax.eval_shape(functools.partial(m.init, **eval_kwargs), key, x)
            for m in self.models
        ]  # fmt: skip
        other = sorted(set(self.grow_kwargs) - set(_GENERIC_KWARGS))
        if other and not all(isinstance(m, _LIBRARY) for m in self.models):
            raise ValueError(
                f"grow_kwargs {other!r} apply to the library's models only; another model "
                f"takes {list(_GENERIC_KWARGS)!r}"
            )
        self.key = jax.random.fold_in(jax.random.PRNGKey(loop.seed), 0x6E0)
        self.stage = 0
        self.growths: list[dict[str, float]] = []
        self.num_compiles: list[int] = []
        self.steps_per_stage: list[int] = []
        self.step_times_ms: list[list[float]] = []
        self.flops_per_step: list[float] = []
        self.compile_time_s = 0.0
        self._open_stage(loop)

    def on_epoch_begin(self, loop: train_lib.Loop) -> None:
        while self.stage + 1 < len(self.starts) and loop.state.epoch >= self.starts[self.stage + 1]:
            self._close_stage(loop)
            self.stage += 1
            self._grow(loop)
            self._open_stage(loop)

    def on_epoch_end(self, loop: train_lib.Loop, row: dict[str, Any]) -> None:
        items = list(row.items())
        row.clear()  # "stage" first, as the row's other figures describe that stage
        row.update({"stage": self.stage, **dict(items)})
        ratios = optax.tree_utils.tree_get(loop.state.opt_state, "ratios")
        if ratios is not None:
            row["lra_ratios"] = [float(r) for r in np.ravel(ratios)]

    def on_train_end(self, loop: train_lib.Loop) -> None:
        self._close_stage(loop)

    def _grow(self, loop: train_lib.Loop) -> None:
        s, stage = loop.state, self.stage
        before = _eval_logits(self.runners[stage - 1], s.params, s.model_state, self.probe)
        t0 = time.perf_counter()
        kw = dict(optimizer=loop.tx, num_stages=self.schedule.num_stages,
                  key=jax.random.fold_in(self.key, stage), **self.grow_kwargs)  # fmt: skip
        old, new = loop.model, self.models[stage]
        if isinstance(old, _LIBRARY):
            variables, s.opt_state = grow(
                {"params": s.params, **s.model_state}, s.opt_state, stage - 1,
                next_shapes=self.shapes[stage], **kw,
            )  # fmt: skip
            s.params = variables.pop("params")
            s.model_state = variables
        elif nnx_support.is_nnx(old):
            old = nnx.clone(old)
            nnx.update(old, s.params, s.model_state)
            s.opt_state = grow_module(old, new, self.probe[:1], opt_state=s.opt_state,
                                      stage=stage - 1, **self._eval_kwargs(), **kw)  # fmt: skip
            s.params, s.model_state = nnx_support.split(new)[1:]
        else:
            variables, s.opt_state = grow_variables(
                old, {"params": s.params, **s.model_state}, self.shapes[stage], self.probe[:1],
                opt_state=s.opt_state, stage=stage - 1, **self._eval_kwargs(), **kw,
            )  # fmt: skip
            s.params = variables.pop("params")
            s.model_state = variables
        jax.block_until_ready((s.params, s.opt_state))
        grow_time = time.perf_counter() - t0
        s.train_time_s += grow_time
        loop.model = new
        after = _eval_logits(self.runners[stage], s.params, s.model_state, self.probe)
        self.growths.append(
            {
                "stage": stage,
                "epoch": s.epoch,
                "step": s.step,
                "train_time_s": s.train_time_s,
                "grow_time_s": grow_time,
                "max_logit_change": float(jnp.max(jnp.abs(after - before))),
                "max_logit": float(jnp.max(jnp.abs(before))),
            }
        )

    def _eval_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of an eval-mode call (an NNX module in ``.eval()``: none)."""
        if self.call == "train" and nnx_support.is_nnx(self.models[0]):
            return {}
        return model_lib.call_kwargs(self.call, False)

    def _open_stage(self, loop: train_lib.Loop) -> None:
        step = loop.step = self.step_for(loop.model, loop.tx)
        s = loop.state
        self._start = (step.phased.num_compiles, step.phased.compile_time_s, s.step,
                       {k: len(v) for k, v in loop.step_times_ms.items()})  # fmt: skip
        if self.flops_batch is not None:  # compiles the stage's first program (counted)
            mask = step.phased.mask_for(s.params, s.opt_state)
            batch = self.flops_batch(s.epoch)
            rng = jax.random.PRNGKey(loop.seed)
            flops = step.phased.flops(mask, s.params, s.opt_state, s.model_state, batch, rng)
            self.flops_per_step.append(flops)

    def _close_stage(self, loop: train_lib.Loop) -> None:
        compiles, compile_time, step0, lengths = self._start
        phased = loop.step.phased
        self.num_compiles.append(phased.num_compiles - compiles)
        self.compile_time_s += phased.compile_time_s - compile_time
        self.steps_per_stage.append(loop.state.step - step0)
        times = loop.step_times_ms.items()
        self.step_times_ms.append([t for k, v in times for t in v[lengths.get(k, 0) :]])


@dataclasses.dataclass
class GrownFitResult:
    """What :func:`fit_grown` returns.

    Attributes:
      params: final params (full width).
      model_state: final mutable collections (batch statistics).
      opt_state: final optimizer state.
      history: one dict per epoch: ``stage``, ``epoch`` (1-based), ``step``, ``train_time_s``
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


class _EpochEnd(train_lib.Callback):
    """Calls ``fn(epoch, row)`` with each complete row."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], None]):
        self.fn = fn

    def on_log(self, loop: train_lib.Loop, row: dict[str, Any]) -> None:
        self.fn(row["epoch"], row)


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
    loss: model_lib.Loss | None = None,
    call: model_lib.Call = "train",
) -> GrownFitResult:
    """Runs a whole grown training: each stage trains, then :func:`grow` maps to the next.

    One :func:`~optax_multirate.train.fit` over ``schedule.total_epochs`` epochs with a
    :class:`GrowthStages` callback and an evaluation on ``test``: epoch ``e`` visits
    ``batches(train, batch_size, seed=seed, epoch=e)``, so a fixed-width run (a one-stage
    schedule, ``m0=1``) sees the same data. Each stage has its own
    :func:`~optax_multirate.train.make_train_step` (one compilation per stage); the optimizer
    state carries over through ``grow``, so schedules continue across stages.

    Args:
      model_fn: ``widths -> Flax model`` (e.g. ``lambda w: CNN(features=w, batch_norm=True)``;
        any Linen or NNX model whose wider twin has the same parameter tree, see
        :class:`GrowthStages`).
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
        ``(stage model, tx, dispatch, loss, call)``; ``num_compiles`` then counts this call's
        compiles.
      loss: the train loss (see :func:`~optax_multirate.train.fit`); the test split reports
        its metrics.
      call: how the model is told train or eval mode (see :func:`~optax_multirate.train.fit`).

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
    flops_batch = None
    if measure_flops:
        flops_batch = lambda e: next(batches(train, batch_size, seed=seed, epoch=e))  # noqa: E731
    stages = GrowthStages(
        model_fn, schedule, probe=test.x[:probe_size], grow_kwargs=grow_kwargs,
        dispatch=dispatch, step_cache=step_cache, flops_batch=flops_batch, loss=loss, call=call,
    )  # fmt: skip
    model = stages.models[0]
    callbacks = [train_lib.Evaluate({"test": test}), stages]
    if on_epoch_end is not None:
        callbacks.append(_EpochEnd(on_epoch_end))
    res = train_lib.fit(
        model, tx, train, epochs=schedule.total_epochs, seed=seed, batch_size=batch_size,
        step=stages.step_for(model, tx), callbacks=callbacks,
    )  # fmt: skip
    return GrownFitResult(
        params=res.params,
        model_state=res.model_state,
        opt_state=res.opt_state,
        history=res.history,
        growths=stages.growths,
        final_accuracy=res.final_accuracy,
        train_time_s=res.train_time_s,
        compile_time_s=stages.compile_time_s,
        num_compiles=stages.num_compiles,
        steps_per_stage=stages.steps_per_stage,
        step_times_ms=stages.step_times_ms,
        flops_per_step=stages.flops_per_step,
    )
