"""In-memory data: a :class:`Split` of numpy arrays and a :class:`Dataset` of two splits.

Nothing here imports TensorFlow Datasets, so a training loop can take a :class:`Split`
without loading TFDS; :func:`optax_multirate.data.load_dataset` fills these classes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Dataset", "Split"]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a data set, held in memory.

    Attributes:
        x: Inputs, ``float32``. Images have shape ``(N, H, W, C)`` scaled to ``[0, 1]``; MNIST-1D
            signals have shape ``(N, 40)``, standardized as generated (mean 0, std 1 overall).
        y: Integer labels, ``int32``, shape ``(N,)``.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y differ in length: {len(self.x)} != {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A data set with a train and a test split.

    Attributes:
        name: Data set name, e.g. ``"digits"``.
        train: Training split.
        test: Test split.
        num_classes: Number of classes; labels are in ``[0, num_classes)``.
        input_shape: Shape of one input, e.g. ``(8, 8, 1)`` or ``(40,)``.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
