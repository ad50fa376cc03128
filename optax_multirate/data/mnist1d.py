"""MNIST-1D from the ``mnist1d`` package's generator, without TensorFlow Datasets.

:func:`generate` is the one wrapper of ``mnist1d.data.make_dataset`` in the project: the
``mnist1d`` TFDS builder (:class:`optax_multirate.data.builders.Mnist1D`) writes what it
returns for the package's defaults, and the transfer benchmark
(:func:`benchmarks.transfer_task.make_task`) splits what it returns for its own size and seed.
``mnist1d`` is imported when :func:`generate` is called, not with this module.
"""

from __future__ import annotations

import random

import numpy as np

from optax_multirate import _checks

__all__ = ["generate"]


def generate(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """MNIST-1D from the ``mnist1d`` generator: its default arguments, ``num_samples`` and ``seed``.

    ``make_dataset`` draws ``num_samples // 10`` signals per digit, shuffles them, standardises
    the whole set (mean 0, standard deviation 1) and keeps 80% for training. It seeds and draws
    from the global ``random`` and ``numpy.random`` states; both are restored afterwards, so
    generating has no side effect on the caller's randomness.

    Args:
      num_samples: signals generated, all ten digits together (at least 10).
      seed: the generator's seed (at least 0).

    Returns:
      ``{"x", "y", "x_test", "y_test"}``: float32 signals ``(n, 40)`` and int32 labels.

    Raises:
      ValueError: if ``num_samples`` is below 10 or ``seed`` below 0.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = _checks.check_int("num_samples", num_samples, low=10)
    args.seed = _checks.check_int("seed", seed, low=0)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(data["x"], np.float32),
        "y": np.asarray(data["y"], np.int32),
        "x_test": np.asarray(data["x_test"], np.float32),
        "y_test": np.asarray(data["y_test"], np.int32),
    }
