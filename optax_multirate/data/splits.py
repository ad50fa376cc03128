"""Deterministic split helpers: validation hold-out and class subsets for transfer learning."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from optax_multirate.data.arrays import Dataset, Split

__all__ = ["filter_classes", "transfer_split", "validation_split"]


def _take(split: Split, indices: np.ndarray) -> Split:
    """Returns the examples of ``split`` at ``indices`` (copies)."""
    return Split(x=split.x[indices], y=split.y[indices])


def validation_split(split: Split, fraction: float = 0.1, *, seed: int = 0) -> tuple[Split, Split]:
    """Holds out a seeded random fraction of a split for validation.

    ``round(fraction * len(split))`` examples, chosen by
    ``np.random.default_rng(seed).permutation``, go to validation and the rest to training;
    both keep the original example order. The result depends only on ``(len(split), fraction,
    seed)``.

    Args:
        split: Split to divide, usually ``dataset.train``.
        fraction: Fraction of examples held out, in ``(0, 1)``.
        seed: Non-negative seed of the permutation.

    Returns:
        ``(train, validation)``, disjoint and together equal to ``split``.

    Raises:
        ValueError: If ``fraction`` is not in ``(0, 1)`` or either part would be empty.

    Example:
        >>> import numpy as np
        >>> s = Split(x=np.zeros((10, 2), np.float32), y=np.arange(10, dtype=np.int32))
        >>> train, val = validation_split(s, 0.2, seed=0)
        >>> len(train), len(val)
        (8, 2)
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    num = len(split)
    num_val = round(fraction * num)
    if not 0 < num_val < num:
        raise ValueError(f"fraction {fraction} of {num} examples leaves an empty part")
    perm = np.random.default_rng(seed).permutation(num)
    return _take(split, np.sort(perm[num_val:])), _take(split, np.sort(perm[:num_val]))


def filter_classes(split: Split, classes: Sequence[int], *, relabel: bool = True) -> Split:
    """Keeps only the examples of the given classes.

    Args:
        split: Split to filter.
        classes: Distinct labels to keep. With ``relabel``, ``classes[i]`` becomes label ``i``.
        relabel: Whether to map the kept labels to ``0..len(classes) - 1`` in the given order;
            otherwise the original labels are kept.

    Returns:
        The examples whose label is in ``classes``, in the original order.

    Raises:
        ValueError: If ``classes`` is empty or has duplicates.

    Example:
        >>> import numpy as np
        >>> s = Split(x=np.zeros((4, 1), np.float32), y=np.array([5, 1, 7, 5], np.int32))
        >>> filter_classes(s, (7, 5)).y
        array([1, 0, 1], dtype=int32)
    """
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be non-empty and distinct, got {classes}")
    keep = np.flatnonzero(np.isin(split.y, classes))
    kept = _take(split, keep)
    if not relabel:
        return kept
    lookup = {c: i for i, c in enumerate(classes)}
    new_y = np.fromiter((lookup[int(c)] for c in kept.y), dtype=np.int32, count=len(kept))
    return Split(x=kept.x, y=new_y)


def transfer_split(
    dataset: Dataset,
    first: Sequence[int] = (0, 1, 2, 3, 4),
    second: Sequence[int] = (5, 6, 7, 8, 9),
) -> tuple[Dataset, Dataset]:
    """Splits a data set by class into two relabelled tasks, e.g. for pretrain / fine-tune.

    Args:
        dataset: Data set to split; both its train and test splits are filtered.
        first: Classes of the first task, relabelled ``0..len(first) - 1`` in this order.
        second: Classes of the second task, relabelled ``0..len(second) - 1`` in this order.

    Returns:
        ``(first_task, second_task)``, named like ``"digits[0,1,2,3,4]"``, each with
        ``num_classes`` equal to its number of classes.

    Raises:
        ValueError: If a class list is empty or has duplicates.
    """
    tasks = []
    for classes in (first, second):
        name = f"{dataset.name}[{','.join(str(int(c)) for c in classes)}]"
        tasks.append(
            dataclasses.replace(
                dataset,
                name=name,
                train=filter_classes(dataset.train, classes),
                test=filter_classes(dataset.test, classes),
                num_classes=len(classes),
            )
        )
    return tasks[0], tasks[1]
