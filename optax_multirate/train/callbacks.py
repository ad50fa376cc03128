"""Callbacks: what :func:`~optax_multirate.train.fit` does besides training.

A callback subclasses :class:`Callback` and overrides the hooks it needs; writing one is the
way to add behaviour to the loop. The hooks, in the order the loop calls them:

* ``on_train_begin(loop)``: before the first step (e.g. restore a checkpoint).
* ``on_epoch_begin(loop)``: before each epoch (e.g. set ``loop.extra``, grow the model).
* ``on_step_end(loop, metrics)``: after each step; ``metrics`` are device arrays, so read
  them only when needed (each read waits for the device).
* ``on_epoch_end(loop, row)``: after each epoch; may add figures to the epoch's ``row``
  (e.g. an evaluation), or set ``loop.stop = True`` (early stopping).
* ``on_log(loop, row)``: after every callback's ``on_epoch_end``, so the row is complete:
  loggers and checkpoints go here, whatever the order of the list.
* ``on_train_end(loop)``: after the last step, when the run ends normally.

``loop`` is the :class:`~optax_multirate.train.Loop`: ``model``, ``tx``, ``step``,
``state`` (a :class:`~optax_multirate.train.LoopState`), ``extra``, ``seed``, ``epochs``,
``max_steps``, ``steps_per_epoch``, ``history`` and ``stop``.

Examples:
  >>> class EarlyStopping(Callback):
  ...     def __init__(self, patience):
  ...         self.patience, self.best, self.waited = patience, -1.0, 0
  ...     def on_epoch_end(self, loop, row):
  ...         if row["val_accuracy"] > self.best:
  ...             self.best, self.waited = row["val_accuracy"], 0
  ...         else:
  ...             self.waited += 1
  ...             loop.stop = self.waited >= self.patience

  Put it after an ``Evaluate({"val": val})``, which writes ``val_accuracy`` into the row.
"""

from __future__ import annotations

import csv
import numbers
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax

from optax_multirate import _checks
from optax_multirate.train import checkpoints
from optax_multirate.train.evaluation import evaluate

if TYPE_CHECKING:
    from optax_multirate.train.loop import Loop

__all__ = [
    "Callback",
    "Evaluate",
    "UpdateExtras",
    "Checkpoint",
    "CSVLogger",
    "TensorBoard",
    "ProgressBar",
]


class Callback:
    """Base class of the loop's plug-ins: every hook does nothing until overridden."""

    def on_train_begin(self, loop: Loop) -> None:
        """Before the first step."""

    def on_epoch_begin(self, loop: Loop) -> None:
        """Before each epoch's first step."""

    def on_step_end(self, loop: Loop, metrics: Mapping[str, jax.Array]) -> None:
        """After each step, with its metrics (device arrays)."""

    def on_epoch_end(self, loop: Loop, row: dict[str, Any]) -> None:
        """After each epoch; may add figures to ``row``."""

    def on_log(self, loop: Loop, row: dict[str, Any]) -> None:
        """After every callback's ``on_epoch_end``: the epoch's complete row."""

    def on_train_end(self, loop: Loop) -> None:
        """After the last step of a run that ended normally."""


class Evaluate(Callback):
    """Evaluates on named splits after each ``every_epochs`` epochs (and after the last).

    Writes ``<name>_<metric>`` into the epoch's row for every metric of the step's loss
    (``<name>_loss``, ``<name>_accuracy`` with the default loss), in eval mode, with
    :func:`~optax_multirate.train.evaluate`. ``fit``'s result reads ``test_accuracy`` as its
    ``final_accuracy``.

    Args:
      splits: ``{name: data}``, each a :class:`~optax_multirate.data.Split` or an iterable
        of batches; any number, or none.
      every_epochs: evaluate after every this many epochs (and after the run's last epoch).
      batch_size: evaluation batch size of a Split.

    Raises:
      TypeError: for ``splits`` that is not a mapping of string names, or a non-integer
        ``every_epochs`` or ``batch_size``.
      ValueError: for ``every_epochs`` or ``batch_size`` below 1.
    """

    def __init__(self, splits: Mapping[str, Any], *, every_epochs: int = 1, batch_size: int = 1000):
        if not isinstance(splits, Mapping) or not all(isinstance(k, str) for k in splits):
            raise TypeError(f"splits must be a mapping of name (str) -> data, got {splits!r}")
        self.splits = dict(splits)
        self.every_epochs = _checks.check_int("every_epochs", every_epochs, low=1)
        self.batch_size = _checks.check_int("batch_size", batch_size, low=1)

    def on_epoch_end(self, loop: Loop, row: dict[str, Any]) -> None:
        epoch = loop.state.epoch
        if epoch % self.every_epochs and epoch < loop.epochs:
            return
        s = loop.state
        for name, data in self.splits.items():
            metrics = evaluate(loop.model, s.params, s.model_state, data,
                               batch_size=self.batch_size, loss=loop.step.loss,
                               call=loop.step.call)  # fmt: skip
            row.update({f"{name}_{k}": v for k, v in metrics.items()})


class UpdateExtras(Callback):
    """Sets host-side extra keyword arguments of ``tx.update`` at each epoch's start.

    ``fn(loop) -> mapping`` is called before each epoch; its items update ``loop.extra``,
    which the loop passes to every step of the epoch. E.g. WUS's signal, the last
    validation accuracy (written by an ``Evaluate({"val": val})``)::

      UpdateExtras(lambda loop: {"value": loop.history[-1]["val_accuracy"] if loop.history
                                 else 0.0})

    Raises:
      TypeError: for a non-callable ``fn``, or an ``fn`` that returns no mapping.
    """

    def __init__(self, fn: Callable[[Loop], Mapping[str, Any]]):
        self.fn = _checks.check_callable("fn", fn)

    def on_epoch_begin(self, loop: Loop) -> None:
        extra = self.fn(loop)
        if not isinstance(extra, Mapping):
            raise TypeError(f"UpdateExtras: fn(loop) must return a mapping, got {extra!r}")
        loop.extra.update(extra)


class Checkpoint(Callback):
    """Checkpoints the run with orbax after each epoch (and each ``every_steps`` steps).

    A checkpoint holds ``{"params", "model_state", "opt_state"}`` and the run's position
    (global step, epoch, batch in the epoch), its history, train time and the running sums of
    the current epoch's metrics. With ``resume=True`` the run continues from the newest
    checkpoint: it skips the batches already consumed and ends with bitwise the params of an
    uninterrupted run. A run stopped inside an epoch (``max_steps``, ``loop.stop``) saves its
    position when it ends.

    Never overwrites: a step already saved is not saved again, the oldest checkpoints beyond
    ``max_to_keep`` are removed only once a newer one is complete, and a directory that is
    not empty is refused unless ``resume=True``.

    Args:
      directory: where the checkpoints go (created if needed).
      every_steps: also checkpoint every this many global steps (None: after epochs only).
      max_to_keep: checkpoints kept (at least 2, so a failing save never leaves none).
      resume: continue from the newest checkpoint in ``directory`` if there is one.

    Raises:
      TypeError: for arguments of the wrong type.
      ValueError: for ``every_steps < 1`` or ``max_to_keep < 2``; when training starts, for a
        non-empty directory without ``resume``, a checkpoint whose tree differs from the run's
        (the message names the paths) or one written with another seed.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every_steps: int | None = None,
        max_to_keep: int = 3,
        resume: bool = False,
    ):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {directory!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.every_steps = _checks.check_int("every_steps", every_steps, low=1, optional=True)
        self.max_to_keep = _checks.check_int("max_to_keep", max_to_keep, low=2)
        self.resume = _checks.check_bool("resume", resume)

    def on_train_begin(self, loop: Loop) -> None:
        d = self.directory
        if not self.resume and d.exists() and any(d.iterdir()):
            steps = checkpoints.all_steps(d)
            raise ValueError(
                f"checkpoint directory {str(d)!r} is not empty (checkpoints at steps "
                f"{steps[-3:]!r}); pass resume=True to continue from the newest, or give an "
                "empty directory (a checkpoint is never overwritten)"
            )
        got = checkpoints.restore_latest(d, self._arrays(loop)) if self.resume else None
        if got is None:
            return
        tree, info = got
        if info["seed"] != loop.seed:
            raise ValueError(
                f"the checkpoints in {str(d)!r} were written by a run with seed={info['seed']!r}, "
                f"this run has seed={loop.seed!r}"
            )
        s = loop.state
        s.params, s.model_state, s.opt_state = loop.step.place(
            (tree["params"], tree["model_state"], tree["opt_state"])
        )
        s.step, s.epoch, s.batch = info["step"], info["epoch"], info["batch"]
        s.history, s.train_time_s = info["history"], info["train_time_s"]
        s.metric_sums, s.metric_steps = info["metric_sums"], info["metric_steps"]

    def on_step_end(self, loop: Loop, metrics: Mapping[str, jax.Array]) -> None:
        if self.every_steps and loop.state.step % self.every_steps == 0:
            self._save(loop)

    def on_log(self, loop: Loop, row: dict[str, Any]) -> None:
        self._save(loop)

    def on_train_end(self, loop: Loop) -> None:
        if loop.state.batch:  # stopped inside an epoch: keep the position
            self._save(loop)

    @staticmethod
    def _arrays(loop: Loop) -> dict[str, Any]:
        s = loop.state
        return {"params": s.params, "model_state": s.model_state, "opt_state": s.opt_state}

    def _save(self, loop: Loop) -> None:
        loop.flush_metrics()
        s = loop.state
        info = {
            "step": s.step,
            "epoch": s.epoch,
            "batch": s.batch,
            "history": s.history,
            "train_time_s": s.train_time_s,
            "metric_sums": s.metric_sums,
            "metric_steps": s.metric_steps,
            "seed": loop.seed,
        }
        checkpoints.save_step(self.directory, s.step, self._arrays(loop), info, self.max_to_keep)


class CSVLogger(Callback):
    """Keeps a CSV file of the history: one row per epoch, rewritten after each epoch.

    The columns are every key of every row, in first-seen order (a figure missing from a
    row, such as an evaluation made every few epochs, is left empty). The file always holds
    the whole run, also after a resume. Written to a temporary file and renamed.
    """

    def __init__(self, path: str | os.PathLike[str]):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a path, got {path!r}")
        self.path = pathlib.Path(path)

    def on_log(self, loop: Loop, row: dict[str, Any]) -> None:
        columns = list(dict.fromkeys(k for r in loop.history for k in r))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(loop.history)
        os.replace(tmp, self.path)


class TensorBoard(Callback):
    """Writes each epoch's numeric figures to TensorBoard at the global step (tensorboardX).

    Raises:
      ImportError: when built without ``tensorboardX`` installed (``pip install
        tensorboardX``).
    """

    def __init__(self, logdir: str | os.PathLike[str]):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError(
                f"TensorBoard(logdir={str(logdir)!r}) needs tensorboardX, which is not "
                "installed: pip install tensorboardX"
            ) from e
        self.logdir = str(logdir)
        self._writer_class = SummaryWriter
        self._writer: Any = None

    def on_log(self, loop: Loop, row: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = self._writer_class(self.logdir)
        for k, v in row.items():
            if k not in ("epoch", "step") and _is_number(v):
                self._writer.add_scalar(k, v, loop.state.step)
        self._writer.flush()

    def on_train_end(self, loop: Loop) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ProgressBar(Callback):
    """A tqdm progress bar over the run's steps, with the epoch's losses and accuracies.

    Raises:
      ImportError: when built without ``tqdm`` installed.
    """

    def __init__(self, desc: str | None = None):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.desc = desc
        self._bar: Any = None

    def on_train_begin(self, loop: Loop) -> None:
        total = None
        if loop.steps_per_epoch is not None:
            total = loop.epochs * loop.steps_per_epoch
            if loop.max_steps is not None:
                total = min(total, loop.max_steps)
        initial = loop.state.step if total is None else min(loop.state.step, total)
        self._bar = self._tqdm(total=total, initial=initial, desc=self.desc, leave=True)

    def on_step_end(self, loop: Loop, metrics: Mapping[str, jax.Array]) -> None:
        self._bar.update(1)

    def on_log(self, loop: Loop, row: dict[str, Any]) -> None:
        shown = {k: v for k, v in row.items() if k.endswith(("_loss", "_accuracy"))}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if _is_number(v)})

    def on_train_end(self, loop: Loop) -> None:
        self._bar.close()


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)
