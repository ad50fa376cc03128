"""Data-parallel training with ``jax.sharding``: the same steps, on a mesh of devices.

Nothing here is method-specific: a :class:`~optax_multirate.PhasedStep` (or any jitted step)
follows the shardings of its inputs, so data parallelism is

1. a 1-D :class:`jax.sharding.Mesh` over the devices (``data_mesh``),
2. the batch sharded over its leading axis (``shard_batch``),
3. params, model state and optimizer state replicated (``replicate``), or sharded where a
   user asks (pass your own :class:`jax.sharding.NamedSharding` tree to ``jax.device_put``).

XLA inserts the gradient all-reduce. Metrics computed in the loss (``jnp.mean`` over the
batch) are means over the **global** batch, so a signal such as WUS's ``value=`` taken from
them is already the all-replica mean, and every replica decides the same phase. Across
hosts, call ``jax.distributed.initialize()`` first and build the mesh over
``jax.devices()`` (all hosts' devices); each host then feeds its own slice of the batch with
``jax.make_array_from_process_local_data``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> mesh = data_mesh()
  >>> batch = shard_batch({"x": jnp.ones((8, 3))}, mesh)
  >>> batch["x"].shape
  (8, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["data_mesh", "shard_batch", "replicate", "DATA_AXIS"]

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices, all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must not be empty")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places each array of ``batch`` sharded over its leading axis on ``mesh``.

    Raises:
      ValueError: if a leading axis does not divide by the number of devices.
    """
    n = mesh.devices.size

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"batch arrays must have a leading axis divisible by the {n} devices of the "
                f"mesh, got shape {tuple(x.shape)}"
            )
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
