"""Evaluation: the example-weighted mean of every metric over a split or batches, in eval mode."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_multirate import _checks
from optax_multirate.data.arrays import Split
from optax_multirate.train import model as model_lib

__all__ = ["evaluate"]


@functools.partial(jax.jit, static_argnames=("runner", "loss"))
def _metric_sums(runner, params, model_state, batch, weight, *, loss):
    """``{metric: sum over examples of weight * per-example metric}`` of one batch."""
    x = model_lib.batch_inputs(batch)
    outputs, _ = runner.apply(params, model_state, x, train=False)

    def one(out, example):  # each example as a batch of one: the metric of that example
        add_axis = functools.partial(jax.tree.map, lambda a: a[None])
        return model_lib.loss_and_metrics(loss, add_axis(out), add_axis(example))[1]

    per_example = jax.vmap(one)(outputs, batch)
    return {k: jnp.sum(weight * jnp.asarray(v, jnp.float32)) for k, v in per_example.items()}


def _split_batches(split: Split, size: int):
    """``(batch, weight)`` of fixed size ``size``: the last one padded with weight 0."""
    for start in range(0, len(split), size):
        x, y = split.x[start : start + size], split.y[start : start + size]
        weight = np.ones(size, np.float32)
        if len(y) < size:
            pad = size - len(y)
            weight[len(y) :] = 0.0
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        yield {"x": x, "y": y}, weight


def _iterable_batches(data: Iterable[Any]):
    for batch in data:
        n = len(model_lib.batch_inputs(batch))
        yield batch, np.ones(n, np.float32)


@_checks.renamed_args(split="data")
def evaluate(
    model: nn.Module | nnx.Module,
    params: Any,
    model_state: Any,
    data: Split | Iterable[Any],
    *,
    batch_size: int = 1000,
    loss: model_lib.Loss | None = None,
    call: model_lib.Call = "train",
) -> dict[str, float]:
    """The mean of every metric of ``model`` over ``data``, in eval mode.

    Each metric of ``loss`` is computed per example (the loss applied to each example as a
    batch of one, under ``vmap``) and averaged over every example of ``data``, so a short
    or padded batch weighs by its examples. A :class:`~optax_multirate.data.Split` is cut
    into batches of one fixed size (the last one padded and masked), so one compiled program
    serves every split of that size class; an iterable of batches is taken as it comes.

    Args:
      model: a Flax Linen or NNX module (NNX: run from ``params`` and ``model_state``, its
        own values unused and unchanged).
      params: its params.
      model_state: its other collections (batch statistics; NNX: the rest of its split), as
        from :func:`~optax_multirate.train.init_model`.
      data: a :class:`~optax_multirate.data.Split`, or an iterable of batches (mappings with
        ``"x"``/``"y"`` or ``"image"``/``"label"``, or ``(x, y)`` tuples).
      batch_size: examples per evaluation batch of a Split (capped at its length).
      loss: ``loss(outputs, batch) -> scalar`` or ``-> (scalar, metrics)``; None: softmax
        cross-entropy and accuracy.
      call: how the model is told eval mode (``"train"``: ``train=False``, or an NNX
        module's ``.eval()`` mode; see :func:`~optax_multirate.train.make_train_step`).

    Returns:
      ``{metric: float}``, e.g. ``{"loss": ..., "accuracy": ...}``.

    Raises:
      ValueError: for empty ``data`` or ``batch_size < 1``.
      TypeError: for a non-integer ``batch_size``, a bad ``loss`` or ``call``, or a model
        that is no Flax module.

    Examples:
      >>> import numpy as np
      >>> from optax_multirate.models import MLP
      >>> from optax_multirate.train import init_model
      >>> m = MLP((4,), num_classes=3)
      >>> p, s = init_model(m, jax.random.PRNGKey(0), np.zeros((1, 2), np.float32))
      >>> split = Split(x=np.zeros((5, 2), np.float32), y=np.zeros(5, np.int32))
      >>> ev = evaluate(m, p, s, split, batch_size=2)
      >>> print(sorted(ev), f"{ev['loss']:.4f}", ev["accuracy"])
      ['accuracy', 'loss'] 1.0986 1.0
    """
    batch_size = _checks.check_int("batch_size", batch_size, low=1)
    loss, runner = model_lib.check_loss(loss), model_lib.flax_model(model, call)
    if isinstance(data, Split):
        if len(data) == 0:
            raise ValueError("data must not be empty, got a Split of 0 examples")
        pairs = _split_batches(data, min(batch_size, len(data)))
    else:
        pairs = _iterable_batches(data)
    sums: dict[str, jax.Array] = {}
    count = 0.0
    for batch, weight in pairs:
        got = _metric_sums(runner, params, model_state, batch, weight, loss=loss)
        sums = got if not sums else {k: sums[k] + got[k] for k in sums}
        count += float(weight.sum())
    if count == 0:
        raise ValueError("data must not be empty, got no examples")
    sums = jax.device_get(sums)
    return {k: float(sums[k]) / count for k in model_lib.metric_order(sums)}
