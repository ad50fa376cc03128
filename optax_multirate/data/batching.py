"""Deterministic fixed-size minibatches of an in-memory split, without TensorFlow.

The order of an epoch is ``np.random.default_rng([seed, epoch]).permutation(len(split))``, a
pure function of ``(seed, epoch)``: a resumed run can restart at any ``(epoch, batch index)``.
The short last batch is dropped, so every batch has exactly ``batch_size`` examples and array
shapes never change (no recompilation under ``jax.jit``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from optax_multirate.data.arrays import Split

__all__ = ["batches", "epoch_arrays", "num_batches"]


def num_batches(split: Split, batch_size: int) -> int:
    """Returns the number of full batches per epoch (the short last batch is dropped).

    Args:
        split: Split to batch.
        batch_size: Examples per batch, in ``[1, len(split)]``.

    Returns:
        ``len(split) // batch_size``.

    Raises:
        ValueError: If ``batch_size`` is not in ``[1, len(split)]``.

    Example:
        >>> import numpy as np
        >>> s = Split(x=np.zeros((10, 3), np.float32), y=np.zeros(10, np.int32))
        >>> num_batches(s, 4)
        2
    """
    if not 1 <= batch_size <= len(split):
        raise ValueError(f"batch_size must be in [1, {len(split)}], got {batch_size}")
    return len(split) // batch_size


def _epoch_order(split: Split, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Returns the example order of one epoch."""
    if not shuffle:
        return np.arange(len(split))
    return np.random.default_rng([seed, epoch]).permutation(len(split))


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    start_batch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the full batches of one epoch in a deterministic order.

    Args:
        split: Split to batch.
        batch_size: Examples per batch, in ``[1, len(split)]``.
        seed: Non-negative seed; the order depends only on ``(seed, epoch)``.
        epoch: Non-negative epoch index.
        shuffle: Whether to permute the examples; if ``False`` they come in stored order.
        start_batch: Index of the first batch to yield, to resume inside an epoch.

    Yields:
        ``{"x": x[idx], "y": y[idx]}`` with exactly ``batch_size`` examples; each example
        appears at most once per epoch.

    Raises:
        ValueError: If ``batch_size`` is not in ``[1, len(split)]``, or ``seed``, ``epoch`` or
            ``start_batch`` is negative.
    """
    count = num_batches(split, batch_size)
    if seed < 0 or epoch < 0 or start_batch < 0:
        raise ValueError(
            f"seed, epoch and start_batch must be >= 0: {seed}, {epoch}, {start_batch}"
        )
    order = _epoch_order(split, seed, epoch, shuffle)
    for index in range(start_batch, count):
        idx = order[index * batch_size : (index + 1) * batch_size]
        yield {"x": split.x[idx], "y": split.y[idx]}


def epoch_arrays(
    split: Split, batch_size: int, *, seed: int, epoch: int = 0, shuffle: bool = True
) -> dict[str, np.ndarray]:
    """Returns one epoch as stacked batches, e.g. to run an epoch with ``jax.lax.scan``.

    Batch ``i`` equals the ``i``-th batch yielded by :func:`batches` with the same arguments.

    Args:
        split: Split to batch.
        batch_size: Examples per batch, in ``[1, len(split)]``.
        seed: Non-negative seed; the order depends only on ``(seed, epoch)``.
        epoch: Non-negative epoch index.
        shuffle: Whether to permute the examples.

    Returns:
        ``{"x": (num_batches, batch_size, *input_shape), "y": (num_batches, batch_size)}``.

    Raises:
        ValueError: If ``batch_size`` is not in ``[1, len(split)]``, or ``seed`` or ``epoch`` is
            negative.
    """
    count = num_batches(split, batch_size)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0: {seed}, {epoch}")
    idx = _epoch_order(split, seed, epoch, shuffle)[: count * batch_size]
    idx = idx.reshape(count, batch_size)
    return {"x": split.x[idx], "y": split.y[idx]}
