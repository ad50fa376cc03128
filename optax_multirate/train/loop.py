"""The training loop: :func:`fit` runs epochs of a train step and calls its callbacks.

The loop itself only trains and times: it steps over the batches of each epoch, keeps the
running means of the step metrics, and writes one row per epoch into the history.
Everything else (evaluation, host-side extras for ``tx.update``, checkpoints, logs,
progress, early stopping, growing the model) is a :class:`~optax_multirate.train.Callback`.

Examples:
  >>> import numpy as np, optax
  >>> from optax_multirate.data import Split
  >>> from optax_multirate.models import MLP
  >>> from optax_multirate.train import Evaluate
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(64, 4)).astype(np.float32)
  >>> split = Split(x=x, y=(x[:, 0] > 0).astype(np.int32))
  >>> res = fit(MLP((8,), num_classes=2), optax.sgd(0.1), split, epochs=2, batch_size=16,
  ...           callbacks=[Evaluate({"test": split})])
  >>> print(len(res.history), res.history[-1]["step"], sorted(res.step_times_ms))
  2 8 ['full']
  >>> more = fit(MLP((8,), num_classes=2), optax.sgd(0.1), split, epochs=3, batch_size=16,
  ...            init=res.state)             # one more epoch, from where the first run stopped
  >>> print(more.steps, [row["epoch"] for row in more.history])
  12 [1, 2, 3]
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

from optax_multirate import _checks
from optax_multirate.data.arrays import Split
from optax_multirate.train import model as model_lib
from optax_multirate.train import source as source_lib
from optax_multirate.train.callbacks import Callback, _is_number
from optax_multirate.train.step import TrainStep, make_train_step, mask_name

__all__ = ["LoopState", "FitResult", "Loop", "fit"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoopState:
    """Where a training run stands; pass it as ``fit(..., init=state)`` to continue the run.

    Attributes:
      params: the params.
      model_state: the other collections (batch statistics).
      opt_state: the optimizer state.
      step: global steps done.
      epoch: epochs done (the epoch being run, counted from 0).
      batch: batches of the current epoch done (0 between epochs).
      history: one row (dict) per epoch done, see :func:`fit`.
      train_time_s: train time so far (compiles, evaluation and callbacks excluded).
      metric_sums: sums of the current epoch's step metrics over its ``metric_steps`` steps,
        so that a run resumed inside an epoch reports the same epoch means.
      metric_steps: steps summed in ``metric_sums``.
    """

    params: Any
    model_state: Any
    opt_state: Any
    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_time_s: float = 0.0
    metric_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    metric_steps: int = 0


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      params: final params.
      model_state: final mutable collections (batch statistics).
      opt_state: final optimizer state.
      history: one dict per epoch (see :func:`fit`).
      train_time_s: total train time, compiles and evaluation excluded.
      compile_time_s: time this call spent compiling step programs.
      step_times_ms: ``{mask name: [per-step wall time in ms]}`` (steps that compiled left
        out; see :func:`~optax_multirate.train.mask_name`).
      masks: ``{mask name: mask}`` of the step programs used.
      steps: global steps done (those of an ``init`` state included).
      num_compiles: step programs this call compiled.
      state: the final :class:`LoopState`, to continue training (``fit(..., init=state)``).
    """

    params: Any
    model_state: Any
    opt_state: Any
    history: list[dict[str, Any]]
    train_time_s: float
    compile_time_s: float
    step_times_ms: dict[str, list[float]]
    masks: dict[str, tuple[bool, ...] | None]
    steps: int
    num_compiles: int
    state: LoopState

    @property
    def final_accuracy(self) -> float:
        """The last row's ``test_accuracy`` (nan if there is none)."""
        return float(self.history[-1].get("test_accuracy", np.nan)) if self.history else np.nan


class Loop:
    """What callbacks see of a running :func:`fit`; they may change what is not read-only.

    Attributes:
      model, tx, step: the model, the optimizer and the :class:`TrainStep` that run the next
        step; a callback may replace them between epochs (a grown model, its new step).
      state: the :class:`LoopState` (params, optimizer state, position, history).
      extra: keyword arguments passed to ``tx.update`` at each step (e.g. ``value=``).
      seed: the run's seed.
      epochs: the epoch count at which training ends.
      max_steps: the global step at which training stops (or None).
      steps_per_epoch: batches per epoch (None when the data does not say).
      stop: set it to True to end training (before the next step).
    """

    def __init__(self, model, tx, step, state, *, seed, epochs, max_steps, steps_per_epoch):
        self.model, self.tx, self.state = model, tx, state
        self.extra: dict[str, Any] = {}
        self.seed, self.epochs, self.max_steps = seed, epochs, max_steps
        self.steps_per_epoch = steps_per_epoch
        self.stop = False
        self.step_times_ms: dict[str, list[float]] = {}
        self.masks: dict[str, tuple[bool, ...] | None] = {}
        self._names: dict[tuple[bool, ...] | None, str] = {}
        self._pending: list[dict[str, jax.Array]] = []
        self._compile_base: dict[int, tuple[TrainStep, int, float]] = {}
        self.step = step

    @property
    def step(self) -> TrainStep:
        return self._step

    @step.setter
    def step(self, step: TrainStep) -> None:
        self._step = step  # its compiles from now on count as this run's
        self._compile_base.setdefault(
            id(step), (step, step.phased.num_compiles, step.phased.compile_time_s)
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        """``state.history``: one row per epoch done."""
        return self.state.history

    def flush_metrics(self) -> None:
        """Adds the step metrics still on the device to ``state.metric_sums`` (one host read)."""
        s = self.state
        for metrics in jax.device_get(self._pending):
            for k in model_lib.metric_order(metrics):
                s.metric_sums[k] = s.metric_sums.get(k, 0.0) + float(metrics[k])
            s.metric_steps += 1
        self._pending = []

    def run_step(self, batch: Any, key: jax.Array) -> dict[str, jax.Array]:
        """One timed step on ``batch``; returns its metrics (device arrays)."""
        step, s = self.step, self.state
        batch = step.shard(source_lib.as_arrays(batch))
        compiled0 = step.phased.compile_time_s
        t0 = time.perf_counter()
        out = step(s.params, s.opt_state, s.model_state, batch, key, **self.extra)
        jax.block_until_ready(out)
        compiled = step.phased.compile_time_s - compiled0
        elapsed = time.perf_counter() - t0 - compiled
        s.params, s.opt_state, s.model_state, metrics = out
        s.train_time_s += elapsed
        s.step += 1
        s.batch += 1
        name = self._mask_name(step.phased.last_mask)
        if compiled == 0.0:
            self.step_times_ms.setdefault(name, []).append(1e3 * elapsed)
        self._pending.append(metrics)
        return metrics

    def _mask_name(self, mask: tuple[bool, ...] | None) -> str:
        name = self._names.get(mask)
        if name is None:
            name = mask_name(mask)
            while name in self.masks:
                name += "'"
            self._names[mask], self.masks[name] = name, mask
        return name

    def end_epoch(self) -> dict[str, Any]:
        """Closes the epoch: its row (epoch, step, train time, ``train_<metric>`` means)."""
        self.flush_metrics()
        s = self.state
        means = {f"train_{k}": v / s.metric_steps for k, v in s.metric_sums.items()}
        s.epoch, s.batch, s.metric_sums, s.metric_steps = s.epoch + 1, 0, {}, 0
        row = {"epoch": s.epoch, "step": s.step, "train_time_s": s.train_time_s, **means}
        s.history.append(row)
        return row

    def result(self) -> FitResult:
        """The run so far as a :class:`FitResult`."""
        self.flush_metrics()
        s = self.state
        base = self._compile_base.values()
        return FitResult(
            params=s.params,
            model_state=s.model_state,
            opt_state=s.opt_state,
            history=list(s.history),
            train_time_s=s.train_time_s,
            compile_time_s=sum(st.phased.compile_time_s - t for st, _, t in base),
            step_times_ms={k: list(v) for k, v in self.step_times_ms.items()},
            masks=dict(self.masks),
            steps=s.step,
            num_compiles=sum(st.phased.num_compiles - n for st, n, _ in base),
            state=s,
        )


def fit(
    model: nn.Module | nnx.Module,
    tx: optax.GradientTransformation,
    data: Split | Callable[[int], Iterable[Any]] | Iterable[Any],
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int | None = None,
    init: LoopState | None = None,
    loss: model_lib.Loss | None = None,
    call: model_lib.Call = "train",
    step: TrainStep | None = None,
    callbacks: Sequence[Callback] = (),
    max_steps: int | None = None,
) -> FitResult:
    """Trains ``model`` with ``tx`` until epoch ``epochs``, calling ``callbacks`` on the way.

    Data: epoch ``e`` of a :class:`~optax_multirate.data.Split` visits ``batches(data,
    batch_size, seed=seed, epoch=e)`` (the short last batch dropped); a callable is called as
    ``data(e)`` for the batches of epoch ``e``; any other re-iterable (a list, a
    ``tf.data.Dataset``, a grain loader) is iterated again each epoch. A batch is a mapping
    with ``"x"``/``"y"`` (or ``"image"``/``"label"``) or a tuple ``(x, y)``. Step ``i`` of
    epoch ``e`` draws dropout from key ``i`` of ``split(fold_in(PRNGKey(seed), e),
    steps_per_epoch)``, or ``fold_in(fold_in(PRNGKey(seed), e), i)`` when the number of
    batches is unknown (a callable). So the run is a function of ``seed`` (and of the data),
    and a run resumed from a checkpoint repeats it exactly.

    Timing: every step ends with ``jax.block_until_ready``; its wall time, less the time the
    step spent compiling, goes to the train time and to ``step_times_ms[mask_name(mask)]``
    (a step that compiled is left out of ``step_times_ms``). Callbacks (evaluation, logs,
    checkpoints) run outside the train time.

    History: after each epoch the loop writes a row ``{"epoch": epochs done, "step": global
    steps, "train_time_s": cumulative, "train_<metric>": the epoch's mean of each step
    metric}``; callbacks add to it in ``on_epoch_end`` (``Evaluate`` writes
    ``<split>_loss``, ``<split>_accuracy``, ...) and read it in ``on_log``.

    A Flax NNX module trains through its split (see
    :func:`~optax_multirate.train.make_train_step`): the result's ``params`` and
    ``model_state`` are ``nnx.State`` of pure arrays, ``nnx.update(model, result.params,
    result.model_state)`` puts them into the module, which ``fit`` never changes. Its initial
    values and its RNG streams (dropout) are the module's own, so ``seed`` orders the batches
    of a Split only.

    Args:
      model: a Flax Linen or NNX module.
      tx: any optax transformation (phased ones get only the gradients they read).
      data: a :class:`~optax_multirate.data.Split`, a callable ``epoch -> iterable of
        batches``, or a re-iterable of batches (not a one-shot iterator or generator).
      epochs: the epoch count at which training ends (``init`` at epoch 3 with ``epochs=5``
        runs two more epochs).
      seed: seeds the init, the batch order of a Split and dropout.
      batch_size: examples per step of a Split (required for one, refused otherwise).
      init: the :class:`LoopState` to start from (e.g. ``previous_result.state``); default:
        :func:`~optax_multirate.train.init_model` with key ``PRNGKey(seed)`` on one example
        (``data.x[:1]`` of a Split, else of the first batch), or the split of an NNX module,
        and ``tx.init(params)``.
      loss: ``loss(outputs, batch) -> scalar`` or ``-> (scalar, metrics)``; None:
        cross-entropy with integer labels, plus accuracy.
      call: how the model is told train or eval mode (see
        :func:`~optax_multirate.train.make_train_step`).
      step: a prebuilt :class:`TrainStep` of this ``model`` and ``tx`` (its compiled
        programs are reused; it carries ``dispatch``, ``extra_args_fn``, ``jit`` and
        ``mesh``); ``loss`` and ``call`` are then its own and must be left at their defaults.
      callbacks: :class:`~optax_multirate.train.Callback` instances, called in this order.
      max_steps: stop before the step that would exceed this global step count.

    Returns:
      A :class:`FitResult`.

    Raises:
      TypeError: for a model that is no Flax module, a one-shot iterator or generator as
        ``data`` (pass a callable ``epoch -> iterable`` instead), ``data`` of another type, a
        ``step`` that is not a TrainStep, a callback that is not a Callback, or an argument
        of the wrong type.
      ValueError: for a negative ``epochs``, ``seed`` or ``max_steps``, a ``batch_size`` out
        of range (or given for data that is not a Split, or missing for a Split), a ``step``
        built for another model or optimizer, or ``loss``/``call`` given with ``step``.
    """
    epochs = _checks.check_int("epochs", epochs, low=0)
    seed = _checks.check_int("seed", seed, low=0)
    max_steps = _checks.check_int("max_steps", max_steps, low=0, optional=True)
    callbacks = _check_callbacks(callbacks)
    step = _train_step(model, tx, step, loss, call)
    devices = 1 if step.mesh is None else step.mesh.devices.size
    source = source_lib.Source.of(data, batch_size, seed, devices)
    state = _initial_state(init, model, tx, step, source, seed)
    loop = Loop(model, tx, step, state, seed=seed, epochs=epochs, max_steps=max_steps,
                steps_per_epoch=source.steps_per_epoch)  # fmt: skip
    _each(callbacks, "on_train_begin", loop)
    while loop.state.epoch < epochs and not (loop.stop or _at_max_steps(loop)):
        _each(callbacks, "on_epoch_begin", loop)
        if not _run_epoch(loop, source, callbacks):
            break  # stopped inside the epoch
        row = loop.end_epoch()
        _each(callbacks, "on_epoch_end", loop, row)
        _each(callbacks, "on_log", loop, row)
        logger.info("epoch %d step %d: %s", row["epoch"], row["step"], _format(row))
    _each(callbacks, "on_train_end", loop)
    return loop.result()


def _run_epoch(loop: Loop, source: source_lib.Source, callbacks: Sequence[Callback]) -> bool:
    """Runs the rest of the current epoch; False if it stopped before the epoch's end."""
    s = loop.state
    keys = source_lib.StepKeys(loop.seed, s.epoch, loop.steps_per_epoch)
    for batch in source.epoch(s.epoch, s.batch):
        if loop.stop or _at_max_steps(loop):
            return False
        metrics = loop.run_step(batch, keys(s.batch))
        _each(callbacks, "on_step_end", loop, metrics)
    return True


def _at_max_steps(loop: Loop) -> bool:
    return loop.max_steps is not None and loop.state.step >= loop.max_steps


def _each(callbacks: Sequence[Callback], hook: str, loop: Loop, *args: Any) -> None:
    for cb in callbacks:
        getattr(cb, hook)(loop, *args)


def _format(row: Mapping[str, Any]) -> str:
    skip = ("epoch", "step")
    return " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in skip and _is_number(v))


def _check_callbacks(callbacks: Any) -> tuple[Callback, ...]:
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a sequence of Callback, got {callbacks!r}")
    callbacks = tuple(callbacks)
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(
                "callbacks must hold optax_multirate.train.Callback instances (subclass "
                f"Callback to add behaviour), got {cb!r}"
            )
    return callbacks


def _train_step(model: Any, tx: Any, step: Any, loss: Any, call: Any) -> TrainStep:
    """``step`` checked against ``model`` and ``tx``, or a new one."""
    model_lib.check_model(model)
    _checks.check_transformation("tx", tx)
    if step is None:
        return make_train_step(model, tx, loss=loss, call=call)
    if not isinstance(step, TrainStep):
        raise TypeError(f"step must be a TrainStep (make_train_step(...)) or None, got {step!r}")
    if step.model != model or step.tx is not tx:
        raise ValueError(
            "step must be a TrainStep built for this model and tx (make_train_step(model, tx, "
            f"...)); got one built for {'another model' if step.model != model else 'another tx'}"
        )
    if loss is not None or not (isinstance(call, str) and call == "train"):
        raise ValueError(
            "loss and call come from step when step is given; leave them at their defaults "
            f"(got loss={loss!r}, call={call!r}) or pass them to make_train_step"
        )
    return step


def _initial_state(
    init: Any, model: Any, tx: Any, step: TrainStep, source: source_lib.Source, seed: int
) -> LoopState:
    """A copy of ``init`` placed for the step, or a fresh init."""
    if init is not None:
        if not isinstance(init, LoopState):
            raise TypeError(f"init must be a LoopState (e.g. result.state) or None, got {init!r}")
        params, model_state, opt_state = step.place((init.params, init.model_state, init.opt_state))
        return dataclasses.replace(
            init, params=params, model_state=model_state, opt_state=opt_state,
            history=[dict(r) for r in init.history], metric_sums=dict(init.metric_sums),
        )  # fmt: skip
    rng = jax.random.PRNGKey(seed)
    params, model_state = model_lib.init_model(model, rng, source.first_inputs(), call=step.call)
    params, model_state = step.place((params, model_state))
    return LoopState(params, model_state, step.place(tx.init(params)))
