"""Deterministic split helpers: validation hold-out and class subsets for transfer learning."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from optax_multirate import _checks
from optax_multirate.data.arrays import Dataset, Split

__all__ = ["filter_classes", "transfer_split", "validation_split"]


def _take(split: Split, indices: np.ndarray) -> Split:
    """Returns the examples of ``split`` at ``indices`` (copies)."""
    return Split(x=split.x[indices], y=split.y[indices])


def _stratified_counts(y: np.ndarray, num_val: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes of ``y`` and how many of each go to a validation part of ``num_val`` examples.

    Each class gets the floor of its proportional quota, at least one and at most its size
    less one; the examples still to give (or take) go one at a time to the class furthest
    below (above) its quota, the first such class on a tie.
    """
    classes, sizes = np.unique(y, return_counts=True)
    if sizes.min() < 2:
        c = classes[np.argmin(sizes)]
        raise ValueError(
            f"stratify needs at least 2 examples of every class, got 1 of class {int(c)}"
        )
    quota = num_val * sizes / len(y)
    counts = np.clip(np.floor(quota).astype(np.int64), 1, sizes - 1)
    while (left := num_val - int(counts.sum())) != 0:
        sign = 1 if left > 0 else -1
        room = counts < sizes - 1 if sign > 0 else counts > 1
        if not room.any():
            break
        counts[np.argmax(np.where(room, sign * (quota - counts), -np.inf))] += sign
    return classes, counts


def validation_split(
    split: Split, fraction: float = 0.1, *, seed: int = 0, stratify: bool = False
) -> tuple[Split, Split]:
    """Holds out a seeded random fraction of a split for validation.

    ``round(fraction * len(split))`` examples, chosen by
    ``np.random.default_rng(seed).permutation``, go to validation and the rest to training;
    both keep the original example order. The result depends only on ``(len(split), fraction,
    seed)``.

    With ``stratify``, each class contributes in proportion to its size (counts rounded by
    largest remainder, so they sum to ``round(fraction * len(split))``), and every class keeps
    at least one example on each side (the total moves only where that cannot be had
    otherwise). Each class's examples are drawn by one generator seeded with ``seed``, class
    after class in sorted label order; the result depends only on ``(split.y, fraction,
    seed)``.

    Args:
        split: Split to divide, usually ``dataset.train``.
        fraction: Fraction of examples held out, in ``(0, 1)``.
        seed: Non-negative seed of the permutation.
        stratify: Keep the class proportions in both parts.

    Returns:
        ``(train, validation)``, disjoint and together equal to ``split``.

    Raises:
        TypeError: If ``fraction`` is not a real number, ``seed`` not an int or ``stratify``
            not a bool.
        ValueError: If ``fraction`` is not in ``(0, 1)``, ``seed`` is negative, either part
            would be empty, or ``stratify`` meets a class with a single example.

    Example:
        >>> import numpy as np
        >>> s = Split(x=np.zeros((10, 2), np.float32), y=np.arange(10, dtype=np.int32))
        >>> train, val = validation_split(s, 0.2, seed=0)
        >>> len(train), len(val)
        (8, 2)
        >>> s = Split(x=np.zeros((40, 2), np.float32), y=np.repeat([0, 1], [30, 10]))
        >>> train, val = validation_split(s, 0.2, seed=0, stratify=True)
        >>> np.bincount(train.y).tolist(), np.bincount(val.y).tolist()
        ([24, 8], [6, 2])
    """
    _checks.check_real("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    _checks.check_int("seed", seed, low=0)
    _checks.check_bool("stratify", stratify)
    num = len(split)
    num_val = round(fraction * num)
    if not 0 < num_val < num:
        raise ValueError(f"fraction {fraction} of {num} examples leaves an empty part")
    rng = np.random.default_rng(seed)
    if not stratify:
        val = rng.permutation(num)[:num_val]
    else:
        classes, counts = _stratified_counts(np.asarray(split.y), num_val)
        val = np.concatenate(
            [rng.permutation(np.flatnonzero(split.y == c))[:k] for c, k in zip(classes, counts)]
        )
    is_val = np.zeros(num, bool)
    is_val[val] = True
    return _take(split, np.flatnonzero(~is_val)), _take(split, np.flatnonzero(is_val))


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
