"""Loading prepared TFDS data sets into small in-memory numpy arrays.

Embedded data sets (``mnist_subset``, ``digits``, ``mnist1d``; see
:mod:`optax_multirate.data.builders`) are prepared into the cache folder on first use. Any other
name is read only if it is already prepared in the data folder (for example by
``tfds build mnist --data_dir DIR`` on a machine with internet); nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from optax_multirate.data.arrays import Dataset, Split
from optax_multirate.data.builders import EMBEDDED_DATASETS, prepare_dataset, resolve_data_dir

__all__ = ["Dataset", "Split", "load_dataset", "prepared_datasets"]

logger = logging.getLogger(__name__)

_READ_CHUNK = 4096

# "namespace:name..." (TFDS community data sets), as opposed to "name:1.2.3" (a version).
_NAMESPACED = re.compile(r"^[^:/]+:(?![\d*])")


def _prepared_names(root: pathlib.Path) -> list[str]:
    """Names (``name`` or ``name/config``) of data sets prepared under ``root``."""
    if not root.is_dir():
        return []
    found = set()
    for info in root.glob("*/*/dataset_info.json"):  # name/version/
        found.add(info.parent.parent.relative_to(root).as_posix())
    for info in root.glob("*/*/*/dataset_info.json"):  # name/config/version/
        found.add(info.parent.parent.relative_to(root).as_posix())
    return sorted(name for name in found if not name.startswith("."))  # Skip scratch folders.


def prepared_datasets(*, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Lists the data sets that are prepared in a data folder.

    Args:
        data_dir: Data folder; see :func:`optax_multirate.data.builders.resolve_data_dir`.

    Returns:
        Sorted names (``name`` or ``name/config``) with a finished build under ``data_dir``.
    """
    return _prepared_names(resolve_data_dir(data_dir))


def _tfds_builder(name: str, root: pathlib.Path) -> tfds.core.DatasetBuilder:
    """Returns a prepared TFDS builder for a non-embedded ``name``; never downloads.

    Raises:
        ValueError: If TFDS does not know ``name`` and it is not prepared under ``root``.
        FileNotFoundError: If TFDS knows ``name`` but it is not prepared under ``root``.
    """
    reason = ""
    builder = None
    if _NAMESPACED.match(name):
        reason = " (namespaced community data sets need the network and are not supported)"
    else:
        try:
            builder = tfds.builder(name, data_dir=os.fspath(root))
        except tfds.core.registered.DatasetNotFoundError:
            pass
        except Exception as error:  # Bad name syntax etc.: report it without a TFDS traceback.
            first_line = (str(error).splitlines() or [""])[0]
            reason = f" ({type(error).__name__}: {first_line})"
    if builder is None:
        prepared = _prepared_names(root) or ["nothing"]
        raise ValueError(
            f"unknown data set {name!r}{reason}. Embedded data sets (prepared offline on first "
            f"use): {', '.join(EMBEDDED_DATASETS)}. Prepared in {root}: {', '.join(prepared)}."
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"data set {name!r} is not prepared in {root}, and nothing is downloaded. Prepare it "
            f"on a machine with internet with `tfds build {name} --data_dir {root}` (copy the "
            f"folder here if needed), or pass data_dir= / set OPTAX_MULTIRATE_DATA_DIR to a "
            f"folder where it is prepared. Embedded data sets: {', '.join(EMBEDDED_DATASETS)}."
        ) from None
    return builder


def _read_split(
    builder: tfds.core.DatasetBuilder, split: str, input_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split through ``builder.as_data_source`` into numpy arrays."""
    source = builder.as_data_source(split)
    num = len(source)
    if num == 0:
        raise ValueError(f"split {split!r} of {builder.name!r} is empty")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for start in range(0, num, _READ_CHUNK):
        records: list[dict[str, Any]] = source.__getitems__(
            list(range(start, min(start + _READ_CHUNK, num)))
        )
        xs.append(np.stack([np.asarray(r[input_key]) for r in records]))
        ys.append(np.asarray([r["label"] for r in records]))
    return np.concatenate(xs), np.concatenate(ys)


def _to_split(x: np.ndarray, y: np.ndarray) -> Split:
    """Converts raw records to a :class:`Split`: images to ``[0, 1]``, labels to int32."""
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    return Split(x=x.astype(np.float32, copy=False), y=y.astype(np.int32))


def load_dataset(name: str, *, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Loads a data set's train and test splits into memory.

    Embedded data sets are prepared into ``data_dir`` first if they are not there yet. Any
    other TFDS name (e.g. ``"mnist"``, ``"cifar10"``) is read only if already prepared in
    ``data_dir``; it is never downloaded. Such data sets need ``image`` and ``label`` features.

    Images become ``float32`` in ``[0, 1]`` with shape ``(N, H, W, C)``: ``uint8`` images are
    divided by 255, except ``digits`` whose values ``0..16`` are divided by 16. ``mnist1d`` gives
    ``(N, 40)`` ``float32`` signals as generated (standardized to mean 0, std 1 overall). Labels
    are ``int32``.

    Args:
        name: Data set name.
        data_dir: Data folder; defaults to ``$OPTAX_MULTIRATE_DATA_DIR``, else
            ``~/.cache/optax_multirate/tensorflow_datasets``.

    Returns:
        The data set.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the embedded data sets and what is
            prepared in ``data_dir``), or a non-embedded data set lacks ``image``/``label``
            features or a ``train``/``test`` split.
        FileNotFoundError: If ``name`` is a TFDS data set that is not prepared in ``data_dir``.
    """
    root = resolve_data_dir(data_dir)
    if name in EMBEDDED_DATASETS:
        builder = prepare_dataset(name, data_dir=root)
    else:
        builder = _tfds_builder(name, root)

    features = builder.info.features
    input_key = "x" if name == "mnist1d" else "image"
    if input_key not in features or "label" not in features:
        raise ValueError(f"data set {name!r} has no {input_key!r} and 'label' features")
    num_classes = getattr(features["label"], "num_classes", None)
    if num_classes is None:
        raise ValueError(f"data set {name!r}: 'label' is not a tfds.features.ClassLabel")
    missing = {"train", "test"} - set(builder.info.splits)
    if missing:
        raise ValueError(f"data set {name!r} has no {sorted(missing)} split(s)")

    splits = {}
    for split in ("train", "test"):
        x, y = _read_split(builder, split, input_key)
        if name == "digits":
            x = x.astype(np.float32) / np.float32(16.0)
        splits[split] = _to_split(x, y)
    logger.info(
        "Loaded %s from %s: %d train, %d test",
        name,
        builder.data_path,
        len(splits["train"]),
        len(splits["test"]),
    )
    return Dataset(
        name=name,
        train=splits["train"],
        test=splits["test"],
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in splits["train"].x.shape[1:]),
    )
