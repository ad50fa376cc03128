"""Training: a jitted train step, evaluation, checkpoints, and one loop with plug-ins.

Every piece takes a Flax Linen module or a Flax NNX module; an NNX module runs through its
split, ``nnx.Param`` leaves as the params and the rest as ``model_state`` (``nnx_support``).

* :func:`init_model`, :func:`classification_loss` (``model``): how a Flax model is called
  (``call``), how a batch is read, and the loss (``loss``).
* :class:`TrainStep`, :func:`make_train_step` (``step``): a
  :class:`~optax_multirate.phases.PhasedStep` around the loss, so a phased transformation
  gets only the gradients it reads; data-parallel with ``mesh=``.
* :func:`evaluate` (``evaluation``): the mean of every metric over a split or batches.
* :func:`save_checkpoint`, :func:`restore_checkpoint`, :func:`latest_checkpoint`
  (``checkpoints``): orbax checkpoints of any pytree.
* :func:`fit`, :class:`LoopState`, :class:`FitResult`, :class:`Loop` (``loop``): epochs of
  the step, timed apart from compiles, calling its callbacks; ``source`` turns ``fit``'s
  ``data`` into the batches of each epoch and gives each step its dropout key.
* :class:`Callback` and the plug-ins (``callbacks``): :class:`Evaluate`,
  :class:`UpdateExtras`, :class:`Checkpoint`, :class:`CSVLogger`, :class:`TensorBoard`,
  :class:`ProgressBar`.
"""

from optax_multirate.train.callbacks import (
    Callback,
    Checkpoint,
    CSVLogger,
    Evaluate,
    ProgressBar,
    TensorBoard,
    UpdateExtras,
)
from optax_multirate.train.checkpoints import (
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from optax_multirate.train.evaluation import evaluate
from optax_multirate.train.loop import FitResult, Loop, LoopState, fit
from optax_multirate.train.model import classification_loss, init_model
from optax_multirate.train.step import TrainStep, make_train_step, mask_name

__all__ = [
    "init_model",
    "classification_loss",
    "TrainStep",
    "make_train_step",
    "mask_name",
    "evaluate",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
    "LoopState",
    "FitResult",
    "Loop",
    "fit",
    "Callback",
    "Evaluate",
    "UpdateExtras",
    "Checkpoint",
    "CSVLogger",
    "TensorBoard",
    "ProgressBar",
]
