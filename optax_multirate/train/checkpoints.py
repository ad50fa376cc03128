"""Checkpoints with orbax: any pytree, its leaves named by path, restored into a target.

Only array leaves are stored, with their paths, shapes and dtypes (a typed PRNG key array,
such as an NNX module's RNG stream key, as its key data, and made a key of the target's
implementation again on restore); static fields (such as a
:class:`~optax_multirate.PhaseTag`'s masks) come back from the restore target, and a
checkpoint of another tree is refused with a message that names the mismatched paths. Orbax
writes each checkpoint to a temporary directory and renames it when complete, so a run that
dies while saving leaves the previous checkpoints intact. Orbax is imported when a
checkpoint is first written or read, never when this module is imported.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from optax_multirate import labels as labels_lib

__all__ = ["save_checkpoint", "restore_checkpoint", "latest_checkpoint"]


def _leaf_meta(tree: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves, meta = [], []
    for path, leaf in flat:
        arr = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        leaves.append(jax.random.key_data(arr) if _is_key(arr) else arr)
        meta.append(
            {
                "path": labels_lib.path_str(path),
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
            }
        )
    return leaves, meta


def _is_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array (stored as its key data)."""
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _template(x: Any) -> jax.ShapeDtypeStruct:
    """What orbax restores a target leaf into (a key's key data for a key)."""
    if _is_key(x):
        x = jax.random.key_data(x)
    if not isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _leaf_key(i: int) -> str:
    return f"leaf_{i:05d}"


def _check_compatible(saved: list[dict[str, Any]], target: Any, where: str) -> None:
    _, want = _leaf_meta(target)
    saved_paths = [m["path"] for m in saved]
    want_paths = [m["path"] for m in want]
    if saved_paths != want_paths:
        missing = [p for p in want_paths if p not in set(saved_paths)]
        extra = [p for p in saved_paths if p not in set(want_paths)]
        if missing or extra:
            raise ValueError(
                f"checkpoint {where} does not match the target tree: the target has "
                f"{missing[:5]!r} which the checkpoint lacks, the checkpoint has {extra[:5]!r} "
                f"which the target lacks ({len(saved_paths)} vs {len(want_paths)} leaves)"
            )
        raise ValueError(
            f"checkpoint {where} has the target's leaves in another order "
            f"(first difference: {next(a for a, b in zip(saved_paths, want_paths) if a != b)!r})"
        )
    pairs = [
        (s, w) for s, w in zip(saved, want) if (s["shape"], s["dtype"]) != (w["shape"], w["dtype"])
    ]
    pairs.sort(key=lambda sw: sw[0]["path"].count("/"))  # shallowest (params) first
    bad = [
        f"{s['path']!r} has shape {tuple(s['shape'])} {s['dtype']}, the target expects "
        f"{tuple(w['shape'])} {w['dtype']}"
        for s, w in pairs
    ]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            f"checkpoint {where} does not match the target tree: leaf "
            + "; leaf ".join(bad[:5])
            + more
        )


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _save_args(tree: Any, info: Mapping[str, Any] | None):
    ocp, _ = _checkpointer()
    leaves, meta = _leaf_meta(tree)
    state = {_leaf_key(i): x for i, x in enumerate(leaves)}
    body = {"leaves": meta, "info": dict(info or {})}
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(body))


def _restore(path: pathlib.Path, target: Any, restore_fn) -> tuple[Any, dict[str, Any]]:
    ocp, _ = _checkpointer()
    body = restore_fn(ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    _check_compatible(body["leaves"], target, str(path))
    leaves, treedef = jax.tree.flatten(target)
    template = {_leaf_key(i): _template(x) for i, x in enumerate(leaves)}
    state = restore_fn(ocp.args.Composite(state=ocp.args.StandardRestore(template)))["state"]
    restored = [
        jax.random.wrap_key_data(state[_leaf_key(i)], impl=jax.random.key_impl(x))
        if _is_key(x)
        else state[_leaf_key(i)]
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, restored), body.get("info", {})


def save_checkpoint(
    path: str | os.PathLike[str], tree: Any, *, info: Mapping[str, Any] | None = None
) -> None:
    """Saves a pytree of arrays with orbax (written atomically; ``path`` must not exist).

    Any pytree works, including optimizer states holding
    :class:`~optax_multirate.phases.PhaseTag`: only the array leaves are stored, with their
    paths, shapes and dtypes; static fields come back from the restore target.

    Args:
      path: a directory that does not exist yet.
      tree: the pytree to save.
      info: optional JSON-serialisable metadata, returned by :func:`restore_checkpoint` with
        ``with_info=True``.

    Raises:
      ValueError: if ``path`` exists.
    """
    path = pathlib.Path(path).absolute()
    if path.exists():
        raise ValueError(f"path {str(path)!r} exists; save_checkpoint never overwrites")
    _, ckptr = _checkpointer()
    ckptr.save(path, args=_save_args(tree, info))


def restore_checkpoint(
    path: str | os.PathLike[str], target: Any, *, with_info: bool = False
) -> Any:
    """Restores a checkpoint of :func:`save_checkpoint` into the structure of ``target``.

    Args:
      path: the checkpoint directory.
      target: a pytree with the saved structure, e.g. ``(params, tx.init(params))`` freshly
        built; only its structure, shapes and dtypes are used.
      with_info: also return the ``info`` mapping that was saved.

    Returns:
      The restored tree (``(tree, info)`` with ``with_info``).

    Raises:
      ValueError: if ``path`` does not exist, or the saved tree differs from ``target`` in
        structure, shapes or dtypes (the message names the mismatched paths).
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise ValueError(f"path {str(path)!r} holds no checkpoint")
    _, ckptr = _checkpointer()
    tree, info = _restore(path, target, lambda args: ckptr.restore(path, args=args))
    return (tree, info) if with_info else tree


def _manager(directory: pathlib.Path, max_to_keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> int | None:
    """The global step of the newest complete checkpoint in ``checkpoint_dir`` (or None)."""
    steps = all_steps(pathlib.Path(checkpoint_dir).absolute())
    return steps[-1] if steps else None


def all_steps(directory: pathlib.Path) -> list[int]:
    """The steps of the complete checkpoints in ``directory`` (none if it does not exist)."""
    if not directory.exists():
        return []
    mgr = _manager(directory, 3)
    try:
        return sorted(mgr.all_steps())
    finally:
        mgr.close()


def save_step(
    directory: pathlib.Path, step: int, tree: Any, info: Mapping[str, Any], max_to_keep: int
) -> bool:
    """Saves ``tree`` as checkpoint ``step`` of ``directory`` unless one exists; True if saved.

    The oldest checkpoints beyond ``max_to_keep`` are removed only after this one is complete.
    """
    mgr = _manager(directory, max_to_keep)
    try:
        if step in mgr.all_steps():
            return False
        mgr.save(step, args=_save_args(tree, info))
        mgr.wait_until_finished()
        return True
    finally:
        mgr.close()


def restore_latest(directory: pathlib.Path, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(tree, info)`` of the newest checkpoint in ``directory``, restored into ``target``."""
    if not directory.exists():
        return None
    mgr = _manager(directory, 3)
    try:
        latest = mgr.latest_step()
        if latest is None:
            return None
        return _restore(directory / str(latest), target, lambda a: mgr.restore(latest, args=a))
    finally:
        mgr.close()
