"""How a Flax model is called, how a batch is read, and the loss of a train step.

The model is a Flax Linen module or a Flax NNX module; :func:`flax_model` is the one place
that tells them apart (an NNX module runs through its split, see
:mod:`optax_multirate.train.nnx_support`). Three small conventions, shared by the step, the
evaluation and the loop:

* ``call`` says how the model is told train from eval mode: ``"train"`` (the default,
  ``model.apply(v, x, train=flag)``), any other keyword name (``"training"`` ->
  ``training=flag``), ``None`` (no flag: ``model.apply(v, x)``), or a callable
  ``call(train) -> dict`` of keyword arguments (``lambda train: {"deterministic": not train}``).
  For an NNX module the default ``"train"`` sets the modes that ``model.train()`` and
  ``model.eval()`` set (Dropout's ``deterministic``, BatchNorm's ``use_running_average``) on
  copies, and passes no keyword; ``None``, another name or a callable work as for Linen.
* A batch is a mapping with ``"x"`` and ``"y"``, or with TFDS's ``"image"`` and ``"label"``,
  or a 2-tuple ``(x, y)``.
* ``loss(outputs, batch)`` returns a scalar, or ``(scalar, metrics)`` with a dict of scalar
  metrics; the default is softmax cross-entropy with integer labels, with ``accuracy``. The
  metrics always include ``loss``.

Mutable collections (``batch_stats``) are updated in train mode and dropout draws from the
step's key, as Flax's examples do (an NNX module: its ``nnx.BatchStat`` and its own RNG
streams, whose counts are part of ``model_state``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from optax_multirate import _checks
from optax_multirate.train import nnx_support

__all__ = [
    "Call",
    "Loss",
    "LinenModel",
    "flax_model",
    "check_model",
    "init_model",
    "classification_loss",
    "apply_model",
    "call_kwargs",
    "check_call",
    "check_loss",
    "batch_inputs",
    "batch_labels",
    "loss_and_metrics",
    "metric_order",
]

#: How the model is called: a keyword name, None (no flag) or ``train -> kwargs``.
Call = str | None | Callable[[bool], Mapping[str, Any]]
#: A user loss: ``loss(outputs, batch) -> scalar`` or ``-> (scalar, metrics)``.
Loss = Callable[[Any, Any], Any]
Metrics = dict[str, jax.Array]

_INPUT_KEYS = ("x", "image")
_LABEL_KEYS = ("y", "label")


def check_call(call: Any) -> Call:
    """Checks a ``call`` argument (a keyword name, None or a callable); returns it.

    Raises:
      TypeError: for anything else.
      ValueError: for a string that is not a Python identifier.
    """
    if call is None or callable(call):
        return call
    if not isinstance(call, str):
        raise TypeError(
            "call must be a keyword name (str), None or a callable train -> dict of keyword "
            f"arguments, got {call!r} ({type(call).__name__})"
        )
    if not call.isidentifier():
        raise ValueError(f"call must name a keyword argument of the model, got {call!r}")
    return call


def check_loss(loss: Any) -> Loss | None:
    """Checks a ``loss`` argument (None or a callable); returns it."""
    return _checks.check_callable("loss", loss, optional=True)


def call_kwargs(call: Call, train: bool) -> dict[str, Any]:
    """The keyword arguments that tell the model train (``train=True``) or eval mode.

    Examples:
      >>> call_kwargs("train", True), call_kwargs("training", False), call_kwargs(None, True)
      ({'train': True}, {'training': False}, {})
      >>> call_kwargs(lambda train: {"deterministic": not train}, True)
      {'deterministic': False}
    """
    if call is None:
        return {}
    if isinstance(call, str):
        return {call: train}
    kwargs = call(train)
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"call(train) must return a dict of keyword arguments, got {kwargs!r}")
    return dict(kwargs)


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a mapping with keys {sorted(map(str, batch))!r}"
    if isinstance(batch, tuple):
        return f"a tuple of {len(batch)} items"
    return f"{type(batch).__name__}"


def _read(batch: Any, keys: tuple[str, str], index: int, what: str) -> Any:
    if isinstance(batch, Mapping):
        for key in keys:
            if key in batch:
                return batch[key]
        raise ValueError(
            f"a batch needs its {what} under {keys[0]!r} or {keys[1]!r}, got "
            f"{_describe_batch(batch)}"
        )
    if isinstance(batch, tuple) and len(batch) == 2:
        return batch[index]
    raise TypeError(
        'a batch must be a mapping with "x" and "y" (or TFDS\'s "image" and "label"), or a '
        f"2-tuple (x, y); got {_describe_batch(batch)}"
    )


def batch_inputs(batch: Any) -> Any:
    """The inputs of a batch: ``batch["x"]``, ``batch["image"]`` or ``batch[0]`` of ``(x, y)``.

    Raises:
      ValueError: for a mapping without ``"x"`` or ``"image"`` (the message lists its keys).
      TypeError: for a batch that is neither a mapping nor a 2-tuple.

    Examples:
      >>> batch_inputs({"image": 1, "label": 2}), batch_inputs((3, 4))
      (1, 3)
      >>> batch_inputs({"inputs": 1})
      Traceback (most recent call last):
      ...
      ValueError: a batch needs its inputs under 'x' or 'image', got a mapping with keys ['inputs']
    """
    return _read(batch, _INPUT_KEYS, 0, "inputs")


def batch_labels(batch: Any) -> Any:
    """The labels of a batch: ``batch["y"]``, ``batch["label"]`` or ``batch[1]`` of ``(x, y)``.

    Raises:
      ValueError: for a mapping without ``"y"`` or ``"label"`` (the message lists its keys).
      TypeError: for a batch that is neither a mapping nor a 2-tuple.
    """
    return _read(batch, _LABEL_KEYS, 1, "labels")


def loss_and_metrics(loss: Loss | None, outputs: Any, batch: Any) -> tuple[jax.Array, Metrics]:
    """``(scalar loss, metrics)`` of a batch from the model's outputs.

    Args:
      loss: ``loss(outputs, batch) -> scalar`` or ``-> (scalar, metrics)``; None: softmax
        cross-entropy of logits ``(batch, classes)`` against integer labels, with accuracy.
      outputs: what the model returned.
      batch: the batch (see :func:`batch_labels`).

    Returns:
      The loss and a dict of scalar metrics that includes ``"loss"``.
    """
    if loss is None:
        labels = batch_labels(batch)
        value = optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()
        accuracy = jnp.mean(jnp.argmax(outputs, -1) == labels)
        return value, {"loss": value, "accuracy": accuracy}
    out = loss(outputs, batch)
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(
                "loss(outputs, batch) must return a scalar or (scalar, dict of metrics), got a "
                f"tuple of {len(out)} items"
            )
        value, metrics = out
        return value, {**dict(metrics), "loss": value}
    return out, {"loss": out}


def metric_order(names: Any) -> list[str]:
    """Metric names in report order: ``"loss"`` first, then the others sorted.

    (A jitted function returns a dict with sorted keys; this puts the loss back in front.)

    Examples:
      >>> metric_order(["accuracy", "loss", "f1"])
      ['loss', 'accuracy', 'f1']
    """
    return sorted(names, key=lambda k: (k != "loss", k))


@dataclasses.dataclass(frozen=True)
class LinenModel:
    """How the train step, the evaluation and the loop run a Linen module.

    Attributes:
      module: the Linen module.
      call: how it is told train or eval mode (see the module docstring).
    """

    module: nn.Module
    call: Call = "train"

    def init(self, rng: jax.Array, sample_x: jax.typing.ArrayLike) -> tuple[Any, dict[str, Any]]:
        """``(params, model_state)`` from ``module.init`` in eval mode."""
        kwargs = call_kwargs(self.call, False)
        rngs = {"params": rng, "dropout": rng}
        variables = dict(self.module.init(rngs, jnp.asarray(sample_x), **kwargs))
        params = variables.pop("params")
        return params, variables

    def apply(
        self,
        params: Any,
        model_state: Mapping[str, Any],
        x: Any,
        *,
        train: bool,
        rng: jax.Array | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """``(outputs, model_state)``; see :func:`apply_model`."""
        variables = {"params": params, **model_state}
        kwargs = call_kwargs(self.call, train)
        if not train:
            return self.module.apply(variables, x, **kwargs), dict(model_state)
        rngs = {"dropout": jax.random.fold_in(rng, 0)}
        mutable = [k for k in model_state if k == "batch_stats"]
        if not mutable:
            return self.module.apply(variables, x, rngs=rngs, **kwargs), dict(model_state)
        outputs, updated = self.module.apply(variables, x, rngs=rngs, mutable=mutable, **kwargs)
        return outputs, {**model_state, **dict(updated)}


def flax_model(model: Any, call: Call = "train") -> LinenModel | nnx_support.NNXModel:
    """How ``model`` is initialised and run: the one place Linen and NNX are told apart.

    Returns:
      A :class:`LinenModel`, or an :class:`~optax_multirate.train.nnx_support.NNXModel` for
      an NNX module; both have ``init(rng, sample_x) -> (params, model_state)`` and
      ``apply(params, model_state, x, *, train, rng) -> (outputs, model_state)``, and are
      hashable (static arguments of a jitted function).

    Raises:
      TypeError: for a model that is no Flax module, or a bad ``call``.
    """
    call = check_call(call)
    if check_model(model) == "nnx":
        return nnx_support.NNXModel.of(model, call)
    return LinenModel(model, call)


def check_model(model: Any) -> str:
    """``"linen"`` or ``"nnx"``: which Flax API ``model`` is written in.

    Raises:
      TypeError: for anything that is no Flax module.
    """
    if nnx_support.is_nnx(model):
        return "nnx"
    if isinstance(model, nn.Module):
        return "linen"
    raise TypeError(
        f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
    )


def apply_model(
    model: nn.Module | nnx.Module,
    params: Any,
    model_state: Mapping[str, Any],
    x: Any,
    *,
    train: bool,
    call: Call = "train",
    rng: jax.Array | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Runs ``model`` on ``x`` in train or eval mode; returns ``(outputs, model_state)``.

    In train mode dropout draws from ``fold_in(rng, 0)`` and ``batch_stats`` (if the model
    has it) is updated; in eval mode nothing is mutable and no key is needed. An NNX module
    runs from its split (``params`` and ``model_state`` as :func:`init_model` gives them):
    dropout draws from its own RNG streams, and its batch statistics and RNG counts come back
    updated in train mode.
    """
    return flax_model(model, call).apply(params, model_state, x, train=train, rng=rng)


def init_model(
    model: nn.Module | nnx.Module,
    rng: jax.Array | None = None,
    sample_x: jax.typing.ArrayLike | None = None,
    *,
    call: Call = "train",
) -> tuple[Any, Any]:
    """Initialises a Flax model, splitting params from the other collections.

    Args:
      model: a Flax Linen module, or a Flax NNX module (already initialised: it is split,
        never changed).
      rng: PRNG key (for the params and, if the model draws at init, dropout); Linen only.
      sample_x: an input batch ``(batch, *input_shape)`` (one example is enough); Linen only.
      call: how the model is told eval mode (see the module docstring); default
        ``model.init(..., train=False)``.

    Returns:
      ``(params, model_state)``. Linen: the ``"params"`` collection and a dict of the others
      (e.g. ``{"batch_stats": ...}``; empty for a model without batch norm). NNX: the
      module's ``nnx.Param`` leaves and the rest (batch statistics, RNG keys and counts), both
      ``nnx.State`` of pure arrays (``nnx.split(model, nnx.Param, ...)`` made pure).

    Raises:
      TypeError: for a model that is no Flax module, a ``call`` that is not a string, None
        or a callable, or a Linen model without ``rng`` and ``sample_x``.

    Examples:
      >>> import numpy as np
      >>> from optax_multirate.models import MLP
      >>> p, s = init_model(MLP((4,)), jax.random.PRNGKey(0), np.zeros((1, 3), np.float32))
      >>> print(sorted(p), s)
      ['Dense_0', 'head'] {}
      >>> from flax import nnx
      >>> p, s = init_model(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> print(sorted(p), p["kernel"].shape, len(s))
      ['bias', 'kernel'] (3, 2) 0
    """
    runner = flax_model(model, call)
    if isinstance(runner, LinenModel) and (rng is None or sample_x is None):
        raise TypeError(
            "init_model of a Linen module needs rng and sample_x (a PRNG key and an input "
            f"batch), got rng={rng!r} and sample_x of type {type(sample_x).__name__}"
        )
    return runner.init(rng, sample_x)


def classification_loss(
    model: nn.Module, *, loss: Loss | None = None, call: Call = "train"
) -> Callable[..., tuple[jax.Array, tuple[Any, Metrics]]]:
    """The train-mode loss of ``model``, as a train step differentiates it.

    Args:
      model: a Flax Linen or NNX module; with the default ``loss`` it returns logits
        ``(batch, num_classes)``.
      loss: ``loss(outputs, batch) -> scalar`` or ``-> (scalar, metrics)``; None: softmax
        cross-entropy with integer labels, plus ``accuracy``.
      call: how the model is told train mode (see the module docstring).

    Returns:
      ``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))``, where
      ``batch`` is read as the module docstring says, ``metrics`` is a dict of scalars that
      includes ``"loss"``, and ``model_state`` holds the updated mutable collections (batch
      statistics). Dropout draws from ``rng`` (an NNX module: from its own RNG streams in
      ``model_state``).

    Raises:
      TypeError: for a ``loss`` that is not callable, a model that is no Flax module, or a
        bad ``call``.

    Examples:
      >>> import numpy as np
      >>> from optax_multirate.models import MLP
      >>> m = MLP((4,), num_classes=3)
      >>> p, s = init_model(m, jax.random.PRNGKey(0), np.zeros((1, 2), np.float32))
      >>> batch = {"x": np.zeros((5, 2), np.float32), "y": np.zeros(5, np.int32)}
      >>> loss, (s, metrics) = classification_loss(m)(p, s, batch, jax.random.PRNGKey(1))
      >>> print(f"{float(loss):.4f} {float(metrics['accuracy']):.1f}")
      1.0986 1.0
      >>> sq = lambda out, b: jnp.mean(out**2)          # a loss of the outputs alone
      >>> loss, (s, metrics) = classification_loss(m, loss=sq)(p, s, (batch["x"], None),
      ...                                                      jax.random.PRNGKey(1))
      >>> print(sorted(metrics), f"{float(loss):.1f}")
      ['loss'] 0.0
    """
    loss = check_loss(loss)
    runner = flax_model(model, call)

    def loss_fn(params, model_state, batch, rng):
        outputs, model_state = runner.apply(
            params, model_state, batch_inputs(batch), train=True, rng=rng
        )
        value, metrics = loss_and_metrics(loss, outputs, batch)
        return value, (model_state, metrics)

    return loss_fn
