"""Train loop: a jitted classification step, evaluation, epochs, metrics, checkpoint and resume.

The step is a :class:`~optax_multirate.phases.PhasedStep` around a classification loss, so any
optax transformation works and a phased one (``freeze_schedule``, the methods of this
library) gets only the gradients it reads. :func:`fit` runs epochs over the deterministic
batches of :mod:`optax_multirate.data` (the order is a function of ``(seed, epoch)``), times
steps apart from compiles and evaluation, evaluates once per epoch, logs metrics (``logging``,
optional CSV and TensorBoard), shows a progress bar, and checkpoints with orbax so that a
resumed run ends with bitwise the same params as an uninterrupted one.

Examples:
  >>> import optax
  >>> from optax_multirate.data import Split
  >>> from optax_multirate.models import MLP
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(64, 4)).astype(np.float32)
  >>> split = Split(x=x, y=(x[:, 0] > 0).astype(np.int32))
  >>> res = fit(MLP((8,), num_classes=2), optax.sgd(0.1), split, split, epochs=2,
  ...           batch_size=16, seed=0)
  >>> print(len(res.history), res.history[-1]["step"], sorted(res.step_times_ms))
  2 8 ['full']
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_multirate import labels as labels_lib
from optax_multirate import parallel
from optax_multirate.data import Split, batches, num_batches
from optax_multirate.phases import PhasedStep

__all__ = [
    "init_model",
    "classification_loss",
    "TrainStep",
    "make_train_step",
    "evaluate",
    "mask_name",
    "FitResult",
    "fit",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
]

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


# ------------------------------------------------------------------------------- model / loss


def init_model(model: nn.Module, rng: jax.Array, sample_x: jax.typing.ArrayLike) -> tuple[Any, Any]:
    """Initialises a Flax model, splitting params from the other collections.

    Args:
      model: a Flax linen module called as ``model(x, train=...)``.
      rng: PRNG key.
      sample_x: an input batch ``(batch, *input_shape)`` (one example is enough).

    Returns:
      ``(params, model_state)``: the ``"params"`` collection and a dict of the others (e.g.
      ``{"batch_stats": ...}``; empty for a model without batch norm).

    Examples:
      >>> from optax_multirate.models import MLP
      >>> p, s = init_model(MLP((4,)), jax.random.PRNGKey(0), np.zeros((1, 3), np.float32))
      >>> print(sorted(p), s)
      ['Dense_0', 'head'] {}
    """
    variables = model.init({"params": rng, "dropout": rng}, jnp.asarray(sample_x), train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return params, {k: v for k, v in variables.items()}


def classification_loss(model: nn.Module) -> Callable[..., tuple[jax.Array, tuple[Any, Metrics]]]:
    """Softmax cross-entropy loss of ``model`` in train mode.

    Args:
      model: a Flax linen module returning logits ``(batch, num_classes)``.

    Returns:
      ``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))`` with
      ``batch = {"x": (B, ...), "y": int (B,)}``, ``metrics = {"loss", "accuracy"}`` (scalars)
      and ``model_state`` the updated mutable collections (batch statistics). Dropout draws
      from ``rng``.

    Examples:
      >>> from optax_multirate.models import MLP
      >>> m = MLP((4,), num_classes=3)
      >>> p, s = init_model(m, jax.random.PRNGKey(0), np.zeros((1, 2), np.float32))
      >>> batch = {"x": np.zeros((5, 2), np.float32), "y": np.zeros(5, np.int32)}
      >>> loss, (s, metrics) = classification_loss(m)(p, s, batch, jax.random.PRNGKey(1))
      >>> print(f"{float(loss):.4f} {float(metrics['accuracy']):.1f}")
      1.0986 1.0
    """

    def loss_fn(params, model_state, batch, rng):
        variables = {"params": params, **model_state}
        rngs = {"dropout": jax.random.fold_in(rng, 0)}
        mutable = [k for k in model_state if k == "batch_stats"]
        if mutable:
            logits, updated = model.apply(
                variables, batch["x"], train=True, rngs=rngs, mutable=mutable
            )
            model_state = {**model_state, **dict(updated)}
        else:
            logits = model.apply(variables, batch["x"], train=True, rngs=rngs)
        labels = batch["y"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, (model_state, {"loss": loss, "accuracy": accuracy})

    return loss_fn


# ------------------------------------------------------------------------------------ the step


class TrainStep:
    """A jitted classification train step over any optax transformation.

    ``step(params, opt_state, model_state, batch, rng, **extra)`` returns
    ``(params, opt_state, model_state, metrics)``. ``extra`` (e.g. ``value=``) goes to
    ``tx.update``, as do the in-graph extras of ``extra_args_fn(metrics)``.

    Attributes:
      phased: the underlying :class:`~optax_multirate.phases.PhasedStep` (``masks``,
        ``last_mask``, ``compile_time_s``, ``num_compiles``, ``flops``).
      model: the Flax model.
      tx: the optax transformation it was built for.
    """

    def __init__(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        *,
        dispatch: str = "host",
        extra_args_fn: Callable[[Metrics], Mapping[str, Any]] | None = None,
        jit: bool = True,
    ):
        if extra_args_fn is not None and not callable(extra_args_fn):
            raise ValueError(f"extra_args_fn must be callable or None, got {extra_args_fn!r}")
        adapted = None
        if extra_args_fn is not None:

            def adapted(loss, aux):
                del loss
                return extra_args_fn(aux[1])

        self.model = model
        self.tx = tx
        self.phased = PhasedStep(
            classification_loss(model),
            tx,
            has_aux=True,
            extra_args_fn=adapted,
            dispatch=dispatch,
            jit=jit,
        )

    def __call__(
        self,
        params: Any,
        opt_state: Any,
        model_state: Any,
        batch: Batch,
        rng: jax.typing.ArrayLike,
        **extra: Any,
    ) -> tuple[Any, Any, Any, Metrics]:
        out = self.phased(params, opt_state, model_state, batch, rng, **extra)
        model_state, metrics = out.aux
        return out.params, out.opt_state, model_state, metrics


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    dispatch: str = "host",
    extra_args_fn: Callable[[Metrics], Mapping[str, Any]] | None = None,
    jit: bool = True,
) -> TrainStep:
    """Builds the jitted train step of ``model`` under ``tx``.

    Args:
      model: Flax linen module ``model(x, train=...) -> logits``.
      tx: any optax transformation (phased or not).
      dispatch: ``"host"``, ``"switch"`` or ``"full"``; see
        :class:`~optax_multirate.phases.PhasedStep`.
      extra_args_fn: ``metrics -> dict`` of in-graph extra keyword arguments for
        ``tx.update``, e.g. ``lambda m: {"value": m["loss"]}``.
      jit: compile (False runs eagerly, for debugging and equality tests).

    Returns:
      A :class:`TrainStep`.

    Raises:
      ValueError: for an unknown ``dispatch`` or a non-callable ``extra_args_fn``.

    Examples:
      >>> import optax
      >>> from optax_multirate.models import MLP
      >>> m, tx = MLP((4,), num_classes=2), optax.sgd(0.1)
      >>> p, s = init_model(m, jax.random.PRNGKey(0), np.zeros((1, 3), np.float32))
      >>> step = make_train_step(m, tx)
      >>> batch = {"x": np.ones((8, 3), np.float32), "y": np.zeros(8, np.int32)}
      >>> p, o, s, metrics = step(p, tx.init(p), s, batch, jax.random.PRNGKey(0))
      >>> print(sorted(metrics), step.phased.num_compiles)
      ['accuracy', 'loss'] 1
    """
    return TrainStep(model, tx, dispatch=dispatch, extra_args_fn=extra_args_fn, jit=jit)


# ---------------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(model, params, model_state, x, y, weight):
    logits = model.apply({"params": params, **model_state}, x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.sum(losses * weight), jnp.sum(correct * weight)


def evaluate(
    model: nn.Module,
    params: Any,
    model_state: Any,
    split: Split,
    *,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on a whole split, in eval mode (``train=False``).

    The split is cut into batches of one fixed size (the last one padded and masked), so one
    compiled program serves every split of that size class.

    Args:
      model: Flax linen module.
      params: its params.
      model_state: its other collections (batch statistics), as from :func:`init_model`.
      split: the examples (any length >= 1).
      batch_size: examples per evaluation batch (capped at ``len(split)``).

    Returns:
      ``{"loss": float, "accuracy": float}``.

    Raises:
      ValueError: for an empty split or ``batch_size < 1``.
    """
    n = len(split)
    if n == 0:
        raise ValueError("split must not be empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    bs = min(batch_size, n)
    loss_sum = jnp.zeros([], jnp.float32)
    correct_sum = jnp.zeros([], jnp.float32)
    for start in range(0, n, bs):
        x, y = split.x[start : start + bs], split.y[start : start + bs]
        weight = np.ones(bs, np.float32)
        if len(y) < bs:
            pad = bs - len(y)
            weight[len(y) :] = 0.0
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        lo, co = _eval_batch(model, params, model_state, x, y, weight)
        loss_sum, correct_sum = loss_sum + lo, correct_sum + co
    loss_sum, correct_sum = jax.device_get((loss_sum, correct_sum))
    return {"loss": float(loss_sum) / n, "accuracy": float(correct_sum) / n}


# ---------------------------------------------------------------------------------- checkpoint


def _leaf_meta(tree: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves, meta = [], []
    for path, leaf in flat:
        arr = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        leaves.append(arr)
        meta.append(
            {
                "path": labels_lib.path_str(path),
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
            }
        )
    return leaves, meta


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
    template = {
        _leaf_key(i): jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        if not isinstance(x, jax.Array)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        for i, x in enumerate(leaves)
    }
    state = restore_fn(ocp.args.Composite(state=ocp.args.StandardRestore(template)))["state"]
    restored = [state[_leaf_key(i)] for i in range(len(leaves))]
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
    directory = pathlib.Path(checkpoint_dir).absolute()
    if not directory.exists():
        return None
    mgr = _manager(directory, 3)
    try:
        return mgr.latest_step()
    finally:
        mgr.close()


# ----------------------------------------------------------------------------------------- fit


def mask_name(mask: Sequence[bool] | None) -> str:
    """Readable name of a gradient mask: ``"full"``, or ``"phase:<live>/<total>"``.

    Examples:
      >>> mask_name((True, True)), mask_name((False, True, True)), mask_name(None)
      ('full', 'phase:2/3', 'switch')
    """
    if mask is None:
        return "switch"
    if all(mask):
        return "full"
    return f"phase:{sum(bool(m) for m in mask)}/{len(mask)}"


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      params: final params.
      model_state: final mutable collections (batch statistics).
      opt_state: final optimizer state.
      history: one dict per epoch: ``epoch`` (1-based), ``step`` (global steps so far),
        ``train_time_s`` (cumulative; compiles and evaluation excluded), ``train_loss`` and
        ``train_accuracy`` (means over the epoch's steps), ``test_loss``, ``test_accuracy``,
        and ``val_loss``, ``val_accuracy`` when a validation split is given.
      final_accuracy: test accuracy after the last epoch (nan if no epoch was evaluated).
      train_time_s: total train time, compiles and evaluation excluded.
      compile_time_s: time spent compiling step programs.
      step_times_ms: ``{mask name: [per-step wall time in ms]}`` (steps that compiled left
        out; see :func:`mask_name`).
      masks: ``{mask name: mask}`` of the step programs used.
      steps: global steps done.
      num_compiles: step programs compiled.
    """

    params: Any
    model_state: Any
    opt_state: Any
    history: list[dict[str, float]]
    final_accuracy: float
    train_time_s: float
    compile_time_s: float
    step_times_ms: dict[str, list[float]]
    masks: dict[str, tuple[bool, ...] | None]
    steps: int = 0
    num_compiles: int = 0


def _tensorboard_writer(logdir: str | os.PathLike[str] | None):
    """``write(step, scalars)`` into ``logdir`` with tensorboardX or TensorFlow (None: off).

    Raises:
      ImportError: if ``logdir`` is given and neither is installed.
    """
    if logdir is None:
        return None
    if importlib.util.find_spec("tensorboardX") is not None:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(logdir))

        def write(step, scalars):
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            writer.flush()

        return write
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf

        writer = tf.summary.create_file_writer(str(logdir))

        def write(step, scalars):
            with writer.as_default():
                for k, v in scalars.items():
                    tf.summary.scalar(k, v, step=step)
            writer.flush()

        return write
    raise ImportError(
        f"tensorboard_dir={str(logdir)!r} needs tensorboardX or tensorflow, and neither is "
        "installed: pip install tensorboardX (or pass tensorboard_dir=None)"
    )


def _append_csv(path: pathlib.Path, row: Mapping[str, Any]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


class _EpochMeter:
    """Running (loss sum, accuracy sum, steps) of an epoch; read from the device lazily."""

    def __init__(self, loss_sum: float, acc_sum: float, count: int):
        self._sums = [float(loss_sum), float(acc_sum), int(count)]
        self._pending: list[Metrics] = []

    def add(self, metrics: Metrics) -> None:
        self._pending.append(metrics)

    def sums(self) -> tuple[float, float, int]:
        got = jax.device_get(self._pending)
        self._pending = []
        self._sums[0] += sum(float(m["loss"]) for m in got)
        self._sums[1] += sum(float(m["accuracy"]) for m in got)
        self._sums[2] += len(got)
        return self._sums[0], self._sums[1], self._sums[2]


def _step_keys(seed: int, epoch: int, count: int) -> np.ndarray:
    """Per-step dropout keys of one epoch (raw uint32), a function of (seed, epoch)."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    return np.asarray(jax.random.split(base, count))


def fit(
    model: nn.Module,
    tx: optax.GradientTransformation,
    train: Split,
    test: Split,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    dispatch: str = "host",
    extra_args_fn: Callable[[Metrics], Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any]
    | Callable[[int, list[dict[str, float]]], Mapping[str, Any]]
    | None = None,
    params: Any = None,
    model_state: Any = None,
    opt_state: Any = None,
    val: Split | None = None,
    progress: bool = False,
    log_csv: str | os.PathLike[str] | None = None,
    tensorboard_dir: str | os.PathLike[str] | None = None,
    on_epoch_end: Callable[[int, FitResult], None] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every_steps: int | None = None,
    max_to_keep: int = 3,
    resume: bool = False,
    max_steps: int | None = None,
    eval_batch_size: int = 1000,
    jit: bool = True,
    desc: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    epoch_offset: int = 0,
    train_step: TrainStep | None = None,
) -> FitResult:
    """Trains a classifier for ``epochs`` epochs and evaluates it after each.

    Epoch ``e`` (0-based) visits ``batches(train, batch_size, seed=seed, epoch=e)``; step
    ``i`` of it draws dropout from key ``i`` of ``split(fold_in(PRNGKey(seed), e))``. So the
    whole run is a function of ``seed`` and a resumed run repeats it exactly.

    Timing: every step ends with ``jax.block_until_ready``; a step's wall time goes to
    ``step_times_ms[mask_name(mask)]`` and to the train time, less the time the step spent
    compiling (``PhasedStep.compile_time_s``; a step that compiled is not put in
    ``step_times_ms``). Evaluation, logging and checkpoints are outside the train time.

    Args:
      model: Flax linen module ``model(x, train=...) -> logits``.
      tx: any optax transformation.
      train: training split.
      test: test split, evaluated after every epoch.
      epochs: number of epochs (>= 0).
      batch_size: examples per step (the short last batch of an epoch is dropped).
      seed: seeds the init (when ``params`` is None), the batch order and dropout.
      dispatch: see :class:`~optax_multirate.phases.PhasedStep`.
      extra_args_fn: ``metrics -> dict`` of in-graph extras for ``tx.update``.
      extra: host-side extras for ``tx.update``, fixed (a mapping) or per epoch
        (``extra(epoch, history) -> mapping``, called at the start of each epoch; e.g. a
        validation accuracy as ``value=``).
      params: initial params (default: ``init_model(model, PRNGKey(seed), train.x[:1])``).
      model_state: initial mutable collections (default: from the same init).
      opt_state: initial optimizer state (default: ``tx.init(params)``).
      val: optional validation split, evaluated after every epoch.
      progress: show a tqdm progress bar.
      log_csv: append one row per epoch to this CSV file.
      tensorboard_dir: write each epoch's scalars there (needs ``tensorboardX`` or
        ``tensorflow``; an ImportError before training if neither is installed).
      on_epoch_end: ``callback(epoch, result_so_far)`` after each epoch's evaluation.
      checkpoint_dir: save ``(params, model_state, opt_state)`` and the data position (step,
        epoch, batch) there with orbax after every epoch (and every
        ``checkpoint_every_steps``); the last ``max_to_keep`` are kept.
      checkpoint_every_steps: also checkpoint every this many global steps.
      max_to_keep: checkpoints kept (>= 2, so a failing save never leaves none).
      resume: continue from the newest checkpoint in ``checkpoint_dir`` if there is one.
      max_steps: stop after this many global steps (saving a checkpoint), e.g. to test resume.
      eval_batch_size: batch size of :func:`evaluate`.
      jit: compile the step (False: eager, for tests).
      desc: progress bar label.
      mesh: run data-parallel on this mesh (e.g. ``parallel.data_mesh()``): each batch is
        sharded over its ``"data"`` axis; params, model state and optimizer state are
        replicated (leaves already sharded on ``mesh`` keep their sharding). The results equal
        a single-device run's within float tolerance; see ``docs/scaling.md``.
      epoch_offset: this call's epoch ``e`` is epoch ``e + epoch_offset`` of a longer run: its
        batches, dropout keys and history numbering (one call per stage of a grown run, as in
        :func:`~optax_multirate.growing.fit_grown`, sees the data of one long run).
      train_step: a :class:`TrainStep` to reuse, built for this ``model`` and ``tx`` (its
        compiled programs carry over between calls; ``dispatch``, ``extra_args_fn`` and
        ``jit`` are then its own). The result's compile figures count this call's compiles.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: for bad ``epochs``, ``batch_size``, ``max_to_keep``,
        ``checkpoint_every_steps`` or ``max_steps``, ``resume`` without ``checkpoint_dir``, a
        ``checkpoint_dir`` that holds checkpoints without ``resume``, or a checkpoint whose
        tree differs from this run's (the message names the paths).
      ImportError: for a ``tensorboard_dir`` without tensorboardX or tensorflow installed.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if isinstance(epoch_offset, bool) or not isinstance(epoch_offset, int) or epoch_offset < 0:
        raise ValueError(f"epoch_offset must be an int >= 0, got {epoch_offset!r}")
    if train_step is not None and not (
        isinstance(train_step, TrainStep) and train_step.model == model and train_step.tx is tx
    ):
        raise ValueError(
            "train_step must be a TrainStep built for this model and tx "
            f"(make_train_step(model, tx, ...)), got {train_step!r}"
        )
    steps_per_epoch = num_batches(train, batch_size)  # validates batch_size
    if max_to_keep < 2:
        raise ValueError(f"max_to_keep must be >= 2, got {max_to_keep!r}")
    if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
        raise ValueError(f"checkpoint_every_steps must be >= 1, got {checkpoint_every_steps!r}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    if mesh is not None and batch_size % mesh.devices.size:
        raise ValueError(
            f"batch_size must divide by the mesh's {mesh.devices.size} devices, got {batch_size!r}"
        )

    tb = _tensorboard_writer(tensorboard_dir)  # fails here, before any work, if unusable
    if params is None or model_state is None:
        p0, s0 = init_model(model, jax.random.PRNGKey(seed), train.x[:1])
        params = p0 if params is None else params
        model_state = s0 if model_state is None else model_state
    if mesh is not None:
        params, model_state = parallel.place((params, model_state), mesh)
    if opt_state is None:
        opt_state = tx.init(params)
    if mesh is not None:
        opt_state = parallel.place(opt_state, mesh)

    step_fn = train_step or make_train_step(
        model, tx, dispatch=dispatch, extra_args_fn=extra_args_fn, jit=jit
    )
    compiles0, compile_time0 = step_fn.phased.num_compiles, step_fn.phased.compile_time_s
    history: list[dict[str, float]] = []
    step_times: dict[str, list[float]] = {}
    masks: dict[str, tuple[bool, ...] | None] = {}
    names: dict[tuple[bool, ...] | None, str] = {}
    train_time = 0.0
    global_step, start_epoch, start_batch = 0, 0, 0

    mgr = None
    if checkpoint_dir is not None:
        mgr = _manager(pathlib.Path(checkpoint_dir).absolute(), max_to_keep)
    if not resume and mgr is not None and mgr.all_steps():
        mgr.close()
        raise ValueError(
            f"checkpoint_dir {str(checkpoint_dir)!r} already holds checkpoints (steps "
            f"{sorted(mgr.all_steps())[-3:]!r}); pass resume=True to continue from the newest, "
            "or give an empty directory (fit never overwrites a checkpoint)"
        )
    if resume and mgr is not None and mgr.latest_step() is not None:
        latest = mgr.latest_step()
        state, info = _restore(
            pathlib.Path(checkpoint_dir) / str(latest),
            {"params": params, "model_state": model_state, "opt_state": opt_state},
            lambda args: mgr.restore(latest, args=args),
        )
        params, model_state, opt_state = state["params"], state["model_state"], state["opt_state"]
        if mesh is not None:
            params, model_state, opt_state = parallel.place((params, model_state, opt_state), mesh)
        if info.get("epoch_offset", 0) != epoch_offset:
            raise ValueError(
                f"the checkpoint in {str(checkpoint_dir)!r} was written with epoch_offset="
                f"{info.get('epoch_offset', 0)!r}, this run has epoch_offset={epoch_offset!r}"
            )
        global_step, start_epoch, start_batch = info["step"], info["epoch"], info["batch"]
        history, train_time = info["history"], info["train_time_s"]
        partial = info.get("partial", [0.0, 0.0, 0])
        logger.info("resumed from step %d (epoch %d, batch %d)", *_info_pos(info))
    else:
        partial = [0.0, 0.0, 0]

    def save(epoch: int, batch: int, sums: Sequence[float] = (0.0, 0.0, 0)) -> None:
        if mgr is None or global_step in mgr.all_steps():
            return
        info = {
            "partial": list(sums),
            "step": global_step,
            "epoch": epoch,
            "batch": batch,
            "history": history,
            "train_time_s": train_time,
            "seed": seed,
            "epoch_offset": epoch_offset,
        }
        state = {"params": params, "model_state": model_state, "opt_state": opt_state}
        mgr.save(global_step, args=_save_args(state, info))
        mgr.wait_until_finished()

    def result() -> FitResult:
        final = history[-1]["test_accuracy"] if history else float("nan")
        return FitResult(
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            history=list(history),
            final_accuracy=final,
            train_time_s=train_time,
            compile_time_s=step_fn.phased.compile_time_s - compile_time0,
            step_times_ms={k: list(v) for k, v in step_times.items()},
            masks=dict(masks),
            steps=global_step,
            num_compiles=step_fn.phased.num_compiles - compiles0,
        )

    csv_path = pathlib.Path(log_csv) if log_csv is not None else None
    total = epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(global_step, total), desc=desc, leave=True)

    stopped = False
    try:
        for epoch in range(start_epoch, epochs):
            first = start_batch if epoch == start_epoch else 0
            data_epoch = epoch + epoch_offset  # the epoch of the whole run
            keys = _step_keys(seed, data_epoch, steps_per_epoch)
            step_extra = dict(extra(data_epoch, history) if callable(extra) else (extra or {}))
            meter = _EpochMeter(*(partial if epoch == start_epoch else (0.0, 0.0, 0)))
            for index, batch in enumerate(
                batches(train, batch_size, seed=seed, epoch=data_epoch, start_batch=first), first
            ):
                if max_steps is not None and global_step >= max_steps:
                    stopped = True
                    save(epoch, index, meter.sums())
                    break
                if mesh is not None:
                    batch = parallel.shard_batch(batch, mesh)
                compile_before = step_fn.phased.compile_time_s
                t0 = time.perf_counter()
                params, opt_state, model_state, metrics = step_fn(
                    params, opt_state, model_state, batch, keys[index], **step_extra
                )
                jax.block_until_ready((params, opt_state, model_state, metrics))
                compiled = step_fn.phased.compile_time_s - compile_before
                elapsed = time.perf_counter() - t0 - compiled
                train_time += elapsed
                global_step += 1
                mask = step_fn.phased.last_mask
                name = names.get(mask)
                if name is None:
                    name = mask_name(mask)
                    while name in masks:
                        name += "'"
                    names[mask], masks[name] = name, mask
                if compiled == 0.0:
                    step_times.setdefault(name, []).append(1e3 * elapsed)
                meter.add(metrics)
                if bar is not None:
                    bar.update(1)
                if checkpoint_every_steps and global_step % checkpoint_every_steps == 0:
                    save(epoch, index + 1, meter.sums())
            if stopped:
                break
            loss_sum, acc_sum, count = meter.sums()
            row = {
                "epoch": data_epoch + 1,
                "step": global_step,
                "train_time_s": train_time,
                "train_loss": loss_sum / max(count, 1),
                "train_accuracy": acc_sum / max(count, 1),
            }
            ev = evaluate(model, params, model_state, test, batch_size=eval_batch_size)
            row.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
            if val is not None:
                ev = evaluate(model, params, model_state, val, batch_size=eval_batch_size)
                row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
            history.append(row)
            logger.info(
                "epoch %d step %d: %s",
                data_epoch + 1,
                global_step,
                " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "step")),
            )
            if bar is not None:
                bar.set_postfix(
                    loss=f"{row['train_loss']:.3f}", test_acc=f"{row['test_accuracy']:.4f}"
                )
            if csv_path is not None:
                _append_csv(csv_path, row)
            if tb is not None:
                tb(global_step, {k: v for k, v in row.items() if k not in ("epoch", "step")})
            save(epoch + 1, 0)
            if on_epoch_end is not None:
                on_epoch_end(data_epoch + 1, result())
    finally:
        if bar is not None:
            bar.close()
        if mgr is not None:
            mgr.close()
    return result()


def _info_pos(info: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(step, epoch, batch)`` of a checkpoint's info."""
    return int(info["step"]), int(info["epoch"]), int(info["batch"])
