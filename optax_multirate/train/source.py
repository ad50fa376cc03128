"""The batches of each epoch of :func:`~optax_multirate.train.fit`, and each step's dropout key.

``data`` is a :class:`~optax_multirate.data.Split` (batched by
:func:`~optax_multirate.data.batches`, the order a function of ``(seed, epoch)``), a callable
``epoch -> iterable of batches``, or a re-iterable of batches (iterated again each epoch). A
one-shot iterator is refused: it would be empty from the second epoch on.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from optax_multirate import _checks
from optax_multirate.data.arrays import Split
from optax_multirate.data.batching import batches, num_batches
from optax_multirate.train import model as model_lib

__all__ = ["Source", "StepKeys", "as_arrays"]


def as_arrays(batch: Any) -> Any:
    """Leaves that are not numpy or JAX arrays (e.g. TensorFlow tensors) as numpy arrays."""
    return jax.tree.map(
        lambda a: a if isinstance(a, (np.ndarray, jax.Array)) else np.asarray(a), batch
    )


class StepKeys:
    """Dropout key of each step of one epoch, a function of ``(seed, epoch, index)``."""

    def __init__(self, seed: int, epoch: int, count: int | None):
        self.base = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
        self.keys = None if count is None else np.asarray(jax.random.split(self.base, count))

    def __call__(self, index: int) -> jax.Array:
        if self.keys is not None and index < len(self.keys):
            return self.keys[index]
        return jax.random.fold_in(self.base, index)


@dataclasses.dataclass
class Source:
    """The batches of each epoch: ``epoch(e, start)`` yields epoch ``e`` from batch ``start``.

    Attributes:
      epoch: ``(epoch, start) -> iterator`` over the batches of ``epoch`` from index ``start``.
      steps_per_epoch: batches per epoch (None when unknown: a callable).
      first_inputs: ``() -> inputs`` of one example, to initialise a model.
    """

    epoch: Callable[[int, int], Iterator[Any]]
    steps_per_epoch: int | None
    first_inputs: Callable[[], Any]

    @classmethod
    def of(cls, data: Any, batch_size: Any, seed: int, devices: int = 1) -> Source:
        """The source of ``fit``'s ``data`` (``batch_size`` must divide by ``devices``).

        Raises:
          TypeError: for a one-shot iterator, a mapping, or data of another type.
          ValueError: for a ``batch_size`` missing for a Split, out of range, or given for
            other data.
        """
        if isinstance(data, Split):
            if batch_size is None:
                raise ValueError("batch_size is required to batch a Split, got None")
            size = _checks.check_int("batch_size", batch_size, low=1)
            count = num_batches(data, size)  # checks batch_size <= len(data)
            if size % devices:
                raise ValueError(
                    f"batch_size must divide by the mesh's {devices} devices, got {size!r}"
                )
            return cls(
                lambda e, start: batches(data, size, seed=seed, epoch=e, start_batch=start),
                count,
                lambda: data.x[:1],
            )
        if batch_size is not None:
            raise ValueError(
                f"batch_size is for a Split only; data of type {type(data).__name__} comes in "
                f"ready batches, got batch_size={batch_size!r}"
            )
        if isinstance(data, Iterator):
            raise TypeError(
                f"data is a one-shot iterator ({type(data).__name__}), but fit iterates the data "
                "once per epoch: pass a callable instead, epoch -> iterable of batches (e.g. "
                "lambda epoch: make_batches(epoch))"
            )
        if isinstance(data, Mapping) or not (callable(data) or isinstance(data, Iterable)):
            what = "a mapping (one batch?)" if isinstance(data, Mapping) else type(data).__name__
            raise TypeError(
                "data must be a Split, a callable epoch -> iterable of batches, or a "
                f"re-iterable of batches (a list, a tf.data dataset, ...), got {what}"
            )
        if callable(data):
            epoch = lambda e, start: itertools.islice(iter(data(e)), start, None)  # noqa: E731
            return cls(epoch, None, lambda: _first_inputs(data(0)))
        epoch = lambda e, start: itertools.islice(iter(data), start, None)  # noqa: E731
        return cls(epoch, _length(data), lambda: _first_inputs(data))


def _first_inputs(batches: Iterable[Any]) -> Any:
    for batch in batches:
        return np.asarray(model_lib.batch_inputs(batch))[:1]
    raise ValueError("data yielded no batch for epoch 0")


def _length(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:  # not sized (e.g. a tf.data dataset of unknown cardinality)
        return None
