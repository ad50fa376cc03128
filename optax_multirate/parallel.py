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

A user who wants some params sharded rather than replicated (a wide layer split over the
devices) builds a :class:`jax.sharding.NamedSharding` tree with :func:`param_shardings` and
places the params with it; ``place(tx.init(params), mesh)`` then gives an optimizer state
sharded like them (``tx.init`` makes its moments with ``zeros_like``, which keeps a
sharding; ``place`` replicates the counters and phase tags), and the step keeps every
sharding from step to step (one compile per phase).
``tests/test_parallel.py`` checks all of this on 8 virtual CPU devices against one device;
``docs/scaling.md`` is the guide.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> mesh = data_mesh()
  >>> batch = shard_batch({"x": jnp.ones((8, 3))}, mesh)
  >>> batch["x"].shape
  (8, 3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optax_multirate import labels as labels_lib

__all__ = [
    "data_mesh",
    "shard_batch",
    "shard_local_batch",
    "replicate",
    "place",
    "param_shardings",
    "DATA_AXIS",
]

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


def place(tree: Any, mesh: Mesh) -> Any:
    """Replicates ``tree`` on ``mesh``, keeping leaves a user already sharded on that mesh.

    A leaf that is a ``jax.Array`` with a :class:`~jax.sharding.NamedSharding` over ``mesh``
    (e.g. placed with :func:`param_shardings`) keeps its sharding; every other leaf is
    replicated. What a train loop calls on ``(params, model_state, opt_state)``.

    Examples:
      >>> import numpy as np
      >>> mesh = data_mesh()
      >>> t = place({"a": np.ones(2)}, mesh)
      >>> print(t["a"].sharding.spec)
      P()
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(put, tree)


def shard_local_batch(batch: Any, mesh: Mesh) -> Any:
    """Assembles each host's slice of the batch into one global batch sharded over ``mesh``.

    For multi-host training (after ``jax.distributed.initialize()``): every process passes the
    examples it loaded itself, ``(local_batch, ...)``, and gets global arrays of leading size
    ``process_count * local_batch``, sharded over the mesh's ``"data"`` axis
    (:func:`jax.make_array_from_process_local_data`). With one process it equals
    :func:`shard_batch`.

    Args:
      batch: a pytree of this process's arrays, leading axis = local batch size.
      mesh: a mesh with a ``"data"`` axis over the devices of every process.

    Returns:
      The same pytree of global, sharded ``jax.Array``.

    Raises:
      ValueError: if a local leading axis does not divide by this process's devices.

    Examples:
      >>> import numpy as np
      >>> b = shard_local_batch({"x": np.ones((4, 2), np.float32)}, data_mesh())
      >>> b["x"].shape
      (4, 2)
    """
    local = max(1, sum(d.process_index == jax.process_index() for d in mesh.devices.flat))
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local:
            raise ValueError(
                f"local batch arrays must have a leading axis divisible by this process's "
                f"{local} devices, got shape {tuple(x.shape)}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def param_shardings(
    params: Any,
    mesh: Mesh,
    rules: Mapping[str, PartitionSpec],
) -> Any:
    """A :class:`~jax.sharding.NamedSharding` tree for ``params``: sharded by rule, else replicated.

    Each rule is a regular expression searched in a leaf's path (``"Conv_1/kernel"``, as
    :func:`optax_multirate.rule_labels` reads paths) mapped to the
    :class:`~jax.sharding.PartitionSpec` of the leaves it matches; unmatched leaves are
    replicated. Place the params with ``jax.device_put(params, shardings)`` and the optimizer
    state with ``place(tx.init(params), mesh)`` so that its moments are sharded like them
    (not ``jax.jit(tx.init)``: its outputs do not depend on the params' values, so they
    come back on one device).

    Args:
      params: the parameter tree (arrays or shape structs).
      mesh: the device mesh.
      rules: ``{path regex: PartitionSpec}``, e.g.
        ``{"^Dense_0/kernel$": PartitionSpec(None, "data")}``.

    Returns:
      A tree shaped like ``params`` with a ``NamedSharding`` at each leaf.

    Raises:
      ValueError: naming the rule or the path, if a rule matches no leaf, a leaf matches
        rules with different specs, a spec has more entries than the leaf has axes, names an
        axis the mesh lacks, or splits an axis whose size the mesh axis does not divide.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"Dense_0": {"kernel": jnp.ones((3, 8))}, "head": {"kernel": jnp.ones((8, 2))}}
      >>> s = param_shardings(p, data_mesh(), {"^Dense_0/kernel$": PartitionSpec(None, "data")})
      >>> print(s["Dense_0"]["kernel"].spec, s["head"]["kernel"].spec)
      P(None, 'data') P()
    """
    if not isinstance(rules, Mapping):
        raise ValueError(f"rules must be a mapping of path regex -> PartitionSpec, got {rules!r}")
    by_spec: dict[PartitionSpec, list[str]] = {}
    for rule, spec in rules.items():
        if not isinstance(spec, PartitionSpec):
            raise ValueError(f"rules[{rule!r}] must be a PartitionSpec, got {spec!r}")
        by_spec.setdefault(spec, []).append(rule)
    replicated = PartitionSpec()
    specs = labels_lib.rule_labels(params, by_spec, default=replicated) if by_spec else None
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    out = []
    for i, (path, leaf) in enumerate(flat):
        spec = spec_leaves[i] if specs is not None else replicated
        _check_spec(labels_lib.path_str(path), np.shape(leaf), spec, mesh)
        out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_spec(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"param {path!r} of shape {shape} has fewer axes than the spec {spec}")
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = 1
        for name in names:
            if name not in mesh.shape:
                raise ValueError(
                    f"spec {spec} of param {path!r} names the axis {name!r}; the mesh has "
                    f"{tuple(mesh.shape)}"
                )
            size *= mesh.shape[name]
        if dim % size:
            raise ValueError(
                f"param {path!r} of shape {shape}: an axis of size {dim} cannot be split over "
                f"{size} devices (spec {spec})"
            )
