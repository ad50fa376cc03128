"""The small data sets, models and run helpers shared by ``lerac`` and ``two_regimes``.

Both benchmarks compare arms on three sets, each under its summary prefix: ``mnist1d_``
(mnist1d), ``mnist_`` (the 5,000-digit MNIST subset) and ``digits_`` (scikit-learn's 8x8
digits). :func:`load` reads one, optionally cut to a stratified subset so that the training
split left after the protocol's validation split has a stated size; :class:`ConvNet` is a
plain convolutional network (1-D on mnist1d, 2-D on images) whose every layer is one depth
unit; :class:`Trainer` makes the runs of one model on one set through
:func:`optax_multirate.train.fit`, each optimizer's step compiled once and reused across
seeds, for selection (validation accuracy at the last epoch) and for the final runs (test
accuracy after every epoch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax

from benchmarks import protocol
from benchmarks.batched import run_batched
from optax_multirate.data import Split, load_dataset, validation_split
from optax_multirate.models import max_pool_2x2
from optax_multirate.train import Evaluate, FitResult, fit, make_train_step

__all__ = [
    "PREFIX",
    "ConvNet",
    "load",
    "EvaluateAt",
    "Trainer",
    "select",
    "put_delta",
    "fill_skipped",
    "on_axis",
]

# data set -> summary prefix
PREFIX = {"mnist1d": "mnist1d_", "mnist_subset": "mnist_", "digits": "digits_"}


def load(name: str, *, train_examples: int | None = None, quick_examples: int | None = None):
    """Loads ``name``; with ``train_examples``, a stratified subset of its training data.

    The subset is drawn (seeded, stratified) so that the protocol's validation split
    (:func:`benchmarks.protocol.three_splits`, 15%) leaves exactly ``train_examples`` to
    train on: ``n`` examples with ``n - round(0.15 n) == train_examples``. The test split is
    untouched. ``quick_examples`` (``--quick``) keeps only the first examples of the result.

    Returns:
      ``(dataset, record)``: the :class:`~optax_multirate.data.Dataset` and a dict for the
      results' config (``name``, ``subset_examples`` or None).

    Examples:
      >>> data, rec = load("digits", train_examples=500)
      >>> splits = protocol.three_splits(data)
      >>> len(splits.train), len(splits.validation), rec["subset_examples"]
      (500, 88, 588)
    """
    data = load_dataset(name)
    record = {"name": name, "subset_examples": None}
    if train_examples is not None:
        n = _subset_size(train_examples)
        if n < len(data.train):
            _, sub = validation_split(data.train, n / len(data.train), seed=0, stratify=True)
            data = dataclasses.replace(data, train=sub)
        record["subset_examples"] = len(data.train)
    if quick_examples is not None:
        cut = Split(x=data.train.x[:quick_examples], y=data.train.y[:quick_examples])
        data = dataclasses.replace(data, train=cut)
    return data, record


def _subset_size(train_examples: int) -> int:
    """The smallest ``n`` whose training part after the validation split is ``train_examples``."""
    n = train_examples
    while n - round(protocol.VALIDATION_FRACTION * n) < train_examples:
        n += 1
    return n


class ConvNet(nn.Module):
    """Convolutions, each followed by a ReLU (and a max-pool where asked), then dense layers.

    One depth unit per layer, in forward order: ``Conv_0``, ``Conv_1``, ..., ``Dense_0``, ...,
    ``head``. Works on 1-D signals (``(batch, length)`` or ``(batch, length, channels)``, e.g.
    mnist1d) and on images (``(batch, height, width, channels)``); the pool halves each
    spatial axis (:func:`optax_multirate.models.max_pool_2x2` on images). The last feature map
    is flattened into the dense layers.

    Attributes:
      features: output channels of each convolution.
      kernel: the kernel's size along each spatial axis.
      pool_after: indices of the convolutions followed by a max-pool.
      dense: widths of the hidden dense layers after the flatten.
      num_classes: width of the ``head``.
    """

    features: Sequence[int] = (16, 32)
    kernel: int = 3
    pool_after: Sequence[int] = (0, 1)
    dense: Sequence[int] = (64,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        del train
        if x.ndim == 2:
            x = x[..., None]
        spatial = x.ndim - 2
        for i, c in enumerate(self.features):
            x = nn.relu(nn.Conv(c, (self.kernel,) * spatial, padding="SAME", name=f"Conv_{i}")(x))
            if i in self.pool_after:
                x = max_pool_2x2(x) if spatial == 2 else _max_pool_1d(x)
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.dense):
            x = nn.relu(nn.Dense(w, name=f"Dense_{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def _max_pool_1d(x: jax.Array) -> jax.Array:
    """``(b, length, c) -> (b, length // 2, c)``: max over pairs (an odd last step dropped)."""
    b, n, c = x.shape
    return x[:, : n // 2 * 2].reshape(b, n // 2, 2, c).max(axis=2)


# ------------------------------------------------------------------------------------ runs


class EvaluateAt(Evaluate):
    """:class:`~optax_multirate.train.Evaluate` at params derived from the loop's state.

    ``params_fn(opt_state, params)`` gives the params to evaluate, e.g.
    ``optax.contrib.schedule_free_eval_params`` (schedule-free methods train at one point and
    are evaluated at another); the loop's own params are left as they are.
    """

    def __init__(self, splits: Mapping[str, Any], params_fn: Callable[[Any, Any], Any], **kw):
        super().__init__(splits, **kw)
        self.params_fn = params_fn

    def on_epoch_end(self, loop: Any, row: dict[str, Any]) -> None:
        s = loop.state
        trained = s.params
        s.params = self.params_fn(s.opt_state, s.params)
        try:
            super().on_epoch_end(loop, row)
        finally:
            s.params = trained


class Trainer:
    """The ``fit`` runs of one model on one set; each optimizer's step is compiled once.

    ``run(key, make, seed, splits)`` trains with ``make()``'s optimizer (built, with its
    :class:`~optax_multirate.train.TrainStep`, the first time ``key`` is seen and reused for
    every later seed) and evaluates on ``splits`` after every ``every_epochs`` epochs, at the
    params ``eval_params(opt_state, params)`` where given.

    Args:
      model: the Flax model.
      train: the training split (without validation).
      batch_size: examples per step.
      epochs: epochs per run.
    """

    def __init__(self, model: nn.Module, train: Split, *, batch_size: int, epochs: int):
        self.model, self.train = model, train
        self.batch_size, self.epochs = batch_size, epochs
        self._steps: dict[Hashable, Any] = {}

    def run(
        self,
        key: Hashable,
        make: Callable[[], optax.GradientTransformation],
        seed: int,
        splits: Mapping[str, Any],
        *,
        every_epochs: int = 1,
        eval_params: Callable[[Any, Any], Any] | None = None,
    ) -> FitResult:
        if key not in self._steps:
            tx = make()
            self._steps[key] = (tx, make_train_step(self.model, tx))
        tx, step = self._steps[key]
        if eval_params is None:
            evaluate = Evaluate(splits, every_epochs=every_epochs)
        else:
            evaluate = EvaluateAt(splits, eval_params, every_epochs=every_epochs)
        return fit(self.model, tx, self.train, epochs=self.epochs, batch_size=self.batch_size,
                   seed=seed, step=step, callbacks=[evaluate])  # fmt: skip

    def outcome(self, key: Hashable, make: Callable, seed: int, validation: Split, **kw):
        """A selection run: :class:`~benchmarks.protocol.RunOutcome` on ``validation``."""
        res = self.run(key, make, seed, {"val": validation}, every_epochs=self.epochs, **kw)
        losses = tuple(row["train_loss"] for row in res.history)
        return protocol.RunOutcome(res.history[-1]["val_accuracy"], losses)

    def final(self, key: Hashable, make: Callable, seed: int, test: Split, **kw) -> dict:
        """A final run's figures: test accuracy after every epoch, times, training loss."""
        return protocol.run_record(self.run(key, make, seed, {"test": test}, **kw))

    def step(self, key: Hashable) -> Any:
        """The :class:`~optax_multirate.train.TrainStep` of ``key`` (after a run of it)."""
        return self._steps[key][1]


def select(
    arm: str,
    grid: Sequence[Mapping[str, Any]],
    make: Callable[..., optax.GradientTransformation],
    trainer: Trainer,
    validation: Split,
    *,
    final_seeds: Sequence[int],
    num_classes: int,
    run: Callable[[dict[str, Any], int], Any] | None = None,
) -> dict[str, Any]:
    """An arm's selection record: every config of ``grid`` on the two selection seeds.

    The runs go through ``run(config, seed)`` (e.g. :meth:`Trainer.outcome`), or, without
    it, through the batched runner (``make(**config)``'s floats vmapped) on the trainer's
    model, training split, batch size and epochs. The grid's length is the arm's budget N.
    """
    if run is None:
        run = run_batched(trainer.model, make, grid, protocol.SELECTION_SEEDS, trainer.train,
                          validation, batch_size=trainer.batch_size,
                          epochs=trainer.epochs).outcome  # fmt: skip
    return protocol.select(arm, grid, run, final_seeds=final_seeds, num_classes=num_classes,
                           budget=len(grid))  # fmt: skip


# --------------------------------------------------------------------------------- summary


def put_delta(
    summary: dict[str, Any], key: str, runs: Sequence[Mapping[str, Any]], arm: str, ref: str
) -> None:
    """``arm - ref`` per seed with its interval, or None where either arm has no runs."""
    if any(r["arm"] == arm for r in runs) and any(r["arm"] == ref for r in runs):
        protocol.put_delta(summary, key, protocol.paired_deltas_pt(runs, arm, ref))
    else:
        summary[key] = None
        summary.update(dict.fromkeys(protocol.ci_keys(key)))


def fill_skipped(summary: dict[str, Any], ran: Sequence[str]) -> None:
    """Writes None under every per-set key of the sets not run (``--quick`` runs fewer).

    ``ran`` holds the names of the sets that ran; each key of the first of them is repeated,
    with None, under the prefix of every set of :data:`PREFIX` that did not run.
    """
    first = PREFIX[ran[0]]
    keys = [k[len(first) :] for k in summary if k.startswith(first)]
    for name, prefix in PREFIX.items():
        if name not in ran:
            summary.update(dict.fromkeys(prefix + k for k in keys))


class on_axis:  # noqa: N801 - used like a function
    """A stand-in figure whose ``add_subplot`` returns ``ax``: draws a one-axis plot (e.g.
    :func:`benchmarks.protocol.plot_accuracy_time`) into one panel of a larger figure."""

    def __init__(self, ax: Any):
        self.ax = ax

    def add_subplot(self, *args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        return self.ax
