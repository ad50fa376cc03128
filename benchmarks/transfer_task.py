"""The transfer task of the multirate benchmark: a pretrained 1D CNN and a small target task.

Everything the fine-tuning comparison of :mod:`benchmarks.multirate_transfer` is built on,
and nothing about how arms are compared (that is :mod:`benchmarks.protocol`):

* **Data** (:func:`make_task`): one MNIST-1D set generated offline by the ``mnist1d``
  package's generator (``make_dataset`` with the package's default arguments, only the number
  of samples and the seed set; :func:`optax_multirate.data.mnist1d.generate`, also known here
  as ``generate_mnist1d``), split by class: digits 0-4 are the large source, digits 5-9
  (relabelled 0-4) the small target, of which only the first ``target_train`` training
  examples are kept. Nothing is downloaded.
* **Model** (:class:`Conv1DNet`): a 1D CNN (convolutions as a ``Dense`` over the signal's
  patches, so that ``jax.vmap`` over runs keeps them matrix products on CPU) with a linear
  ``head``; with a :class:`Backbone` it starts every run from the pretrained convolutions and a
  fresh head drawn from the run's seed, in :func:`optax_multirate.fit` and in
  :func:`benchmarks.batched.run_batched` alike.
* **Pretraining** (:func:`pretrain`): plain SGD through :func:`optax_multirate.fit`.
* **Optimizers** of the arms, each with its schedule fitted to the run's budget:
  :func:`train_all_tx`, :func:`head_only_tx`, :func:`multirate_tx` (fast and slow step sizes
  chosen apart, not a slow step fixed at ``k`` times the fast one).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import protocol
from optax_multirate import _checks
from optax_multirate.data import Dataset, Split, batches, num_batches
from optax_multirate.data.mnist1d import generate as generate_mnist1d
from optax_multirate.labels import rule_labels
from optax_multirate.multirate import multirate
from optax_multirate.phases import freeze_schedule
from optax_multirate.train import Evaluate, ProgressBar, evaluate, fit, init_model

__all__ = [
    "SOURCE_CLASSES",
    "TARGET_CLASSES",
    "TransferTask",
    "generate_mnist1d",
    "make_task",
    "reverse_time",
    "Backbone",
    "Conv1DNet",
    "fast_slow_labels",
    "train_all_tx",
    "head_only_tx",
    "multirate_tx",
    "budget_data",
    "Pretrained",
    "pretrain",
]

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
MOMENTUM = 0.9

# ------------------------------------------------------------------------------------- data


class TransferTask(NamedTuple):
    """The source and target data sets and what they are.

    ``record`` goes into the results' ``config``: the generator's arguments, the classes and
    the sizes of every split.
    """

    source: Dataset
    target: Dataset
    record: dict[str, Any]


def _classes(x: np.ndarray, y: np.ndarray, classes: Sequence[int], n: int | None = None) -> Split:
    """The examples of ``classes`` (the first ``n``), labels renumbered ``0..len-1``."""
    keep = np.isin(y, classes)
    relabel = np.full(10, -1, np.int32)
    relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)
    x, y = x[keep][:n], relabel[y[keep]][:n]
    return Split(x=np.ascontiguousarray(x), y=y)


def make_task(*, num_samples: int, seed: int, target_train: int) -> TransferTask:
    """The source (digits 0-4, all of them) and the small target (digits 5-9) of one MNIST-1D set.

    Args:
      num_samples: signals generated (all ten digits; 80% of them are training signals).
      seed: the generator's seed.
      target_train: training examples of the target kept (the first ones, in the generator's
        shuffled order); the target's test split keeps every test signal of digits 5-9.

    Returns:
      A :class:`TransferTask`.

    Raises:
      ValueError: if ``target_train`` is below 10 or above the target examples generated.
    """
    data = generate_mnist1d(num_samples, seed)
    source = Dataset(
        "mnist1d digits 0-4",
        _classes(data["x"], data["y"], SOURCE_CLASSES),
        _classes(data["x_test"], data["y_test"], SOURCE_CLASSES),
        len(SOURCE_CLASSES),
        (40,),
    )
    pool = int(np.isin(data["y"], TARGET_CLASSES).sum())
    _checks.check_int("target_train", target_train, low=10, high=pool)
    train = _classes(data["x"], data["y"], TARGET_CLASSES, target_train)
    test = _classes(data["x_test"], data["y_test"], TARGET_CLASSES)
    target = Dataset("mnist1d digits 5-9", train, test, len(TARGET_CLASSES), (40,))
    record = {
        "generator": f"mnist1d.data.make_dataset(get_dataset_args()) with num_samples="
        f"{num_samples}, seed={seed} (every other argument the package's default)",
        "source": f"digits {SOURCE_CLASSES[0]}-{SOURCE_CLASSES[-1]}: {len(source.train)} "
        f"training signals, {len(source.test)} test signals",
        "target": f"digits {TARGET_CLASSES[0]}-{TARGET_CLASSES[-1]} relabelled 0-4: the first "
        f"{len(train)} training signals, {len(test)} test signals",
        "source_train_examples": len(source.train),
        "source_test_examples": len(source.test),
        "target_train_examples": len(train),
        "target_test_examples": len(test),
    }
    return TransferTask(source, target, record)


def reverse_time(data: Dataset) -> Dataset:
    """The data set with every signal time-reversed: a domain shift for a pretrained backbone.

    A backbone pretrained on forward signals must adapt to reversed ones, so the backbone has
    to move (the harder task).

    Examples:
      >>> s = Split(x=np.arange(6, dtype=np.float32).reshape(2, 3), y=np.zeros(2, np.int32))
      >>> reverse_time(Dataset("toy", s, s, 1, (3,))).train.x[0].tolist()
      [2.0, 1.0, 0.0]
    """
    flip = lambda s: Split(x=np.ascontiguousarray(s.x[:, ::-1]), y=s.y)
    return Dataset(f"{data.name}, time-reversed", flip(data.train), flip(data.test),
                   data.num_classes, data.input_shape)  # fmt: skip


# ------------------------------------------------------------------------------------ model


class Backbone:
    """Pretrained params for :class:`Conv1DNet` to start from (compared by identity).

    Attributes:
      params: the pretrained ``params`` collection; every entry but ``head`` is copied into a
        fresh init.
    """

    def __init__(self, params: Mapping[str, Any]):
        self.params = {k: v for k, v in params.items() if k != "head"}

    def __repr__(self) -> str:
        return f"Backbone({sorted(self.params)})"


def _patches(x: jax.Array, size: int) -> jax.Array:
    """``(b, length, c) -> (b, length, size * c)``: each position's window, "SAME" padding."""
    left = size // 2
    xp = jnp.pad(x, ((0, 0), (left, size - 1 - left), (0, 0)))
    return jnp.concatenate([xp[:, i : i + x.shape[1]] for i in range(size)], axis=-1)


class Conv1DNet(nn.Module):
    """1D CNN for MNIST-1D: convolutions, each + relu + max-pool 2, then a linear ``head``.

    Convolution ``Conv_i`` is a ``Dense`` over each position's window of ``kernel_size``
    samples ("SAME" padding, stride 1), the same function as a 1D convolution; written as a
    matrix product, it stays one when ``jax.vmap`` batches many runs (a vmapped convolution
    becomes a grouped one, many times slower on CPU). After the last pool the features are
    flattened into the ``head``.

    Attributes:
      features: output channels of each convolution.
      kernel_size: window length of every convolution.
      num_classes: width of the ``head``.
      backbone: pretrained convolutions to start from: :meth:`init` draws a fresh model from
        its key and replaces every param but the head's by the backbone's.

    Examples:
      >>> m = Conv1DNet((4, 8), num_classes=3)
      >>> p = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 40)))["params"]
      >>> sorted(p), m.apply({"params": p}, jnp.zeros((2, 40))).shape
      (['Conv_0', 'Conv_1', 'head'], (2, 3))
      >>> warm = m.clone(backbone=Backbone(p))
      >>> q = warm.init(jax.random.PRNGKey(1), jnp.zeros((1, 40)))["params"]
      >>> bool((q["Conv_1"]["kernel"] == p["Conv_1"]["kernel"]).all())
      True
      >>> bool((q["head"]["kernel"] == p["head"]["kernel"]).all())
      False
    """

    features: Sequence[int] = (32, 64, 128)
    kernel_size: int = 5
    num_classes: int = 5
    backbone: Backbone | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        del train  # no dropout, no batch norm
        x = x[..., None] if x.ndim == 2 else x
        for i, c in enumerate(self.features):
            x = nn.relu(nn.Dense(c, name=f"Conv_{i}")(_patches(x, self.kernel_size)))
            b, length, ch = x.shape
            x = x[:, : length // 2 * 2].reshape(b, length // 2, 2, ch).max(axis=2)
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        """Flax's ``init`` (jitted); with a :attr:`backbone`, its params replace all but the head's.

        Raises:
          ValueError: if the backbone's params do not match this model's (names, shapes).
        """
        base = self if self.backbone is None else self.clone(backbone=None)
        variables = _jitted_init(base, tuple(sorted(kwargs.items())))(rngs, *args)
        if self.backbone is None:
            return variables
        params = dict(variables["params"])
        fresh = jax.tree.map(jnp.shape, {k: params.get(k) for k in self.backbone.params})
        if fresh != jax.tree.map(jnp.shape, self.backbone.params):
            raise ValueError(
                f"backbone params do not match the model's: {jax.tree.map(jnp.shape, fresh)} "
                f"vs {jax.tree.map(jnp.shape, self.backbone.params)}"
            )
        params.update(self.backbone.params)
        return {**variables, "params": params}


@functools.lru_cache(maxsize=32)
def _jitted_init(model: Conv1DNet, kwargs: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """Flax's init of ``model`` as one program (eager, each operation compiles apart)."""
    return jax.jit(lambda rngs, *args: nn.Module.init(model, rngs, *args, **dict(kwargs)))


def fast_slow_labels(params: Any) -> Any:
    """``"fast"`` for the head's params, ``"slow"`` for every other (the backbone's).

    Examples:
      >>> fast_slow_labels({"Conv_0": {"kernel": 0}, "head": {"kernel": 0, "bias": 0}})
      {'Conv_0': {'kernel': 'slow'}, 'head': {'bias': 'fast', 'kernel': 'fast'}}
    """
    return rule_labels(params, {"fast": "^head(/|$)"}, default="slow")


# ------------------------------------------------------------------------------- optimizers


def _sgd(learning_rate: Any, steps: int) -> optax.GradientTransformation:
    """SGD with momentum, a cosine decay from ``learning_rate`` to 0 over ``steps`` updates."""
    sched = protocol.fitted_schedule({"learning_rate": learning_rate}, steps)
    return optax.sgd(sched, momentum=MOMENTUM)


def train_all_tx(*, learning_rate: Any, steps: int) -> optax.GradientTransformation:
    """Every param at one step size: SGD with momentum, cosine over ``steps``.

    Examples:
      >>> tx = train_all_tx(learning_rate=0.1, steps=10)
      >>> u, _ = tx.update({"w": jnp.ones(())}, tx.init({"w": jnp.zeros(())}))
      >>> print(f"{float(u['w']):.2f}")
      -0.10
    """
    return _sgd(learning_rate, steps)


def head_only_tx(*, learning_rate: Any, steps: int) -> optax.GradientTransformation:
    """The head alone (backbone frozen for good, never differentiated under the phased step)."""
    return freeze_schedule(_sgd(learning_rate, steps), fast_slow_labels, {"slow": (0, None)})


def multirate_tx(
    *, fast_learning_rate: Any, slow_learning_rate: Any, k: int, steps: int
) -> optax.GradientTransformation:
    """Multirate fine-tuning (linear drift): head fast, backbone slow on a k-step clock.

    The head takes SGD with momentum at ``fast_learning_rate`` every step; the backbone takes
    one SGD-with-momentum update of step size ``slow_learning_rate`` per cycle of ``k`` steps,
    from the gradient at the cycle start, spread evenly over the cycle's steps
    (:func:`optax_multirate.multirate`). Each step size decays by a cosine over the run:
    ``steps`` updates for the head, ``ceil(steps / k)`` cycles for the backbone.

    Examples:
      >>> tx = multirate_tx(fast_learning_rate=0.1, slow_learning_rate=0.4, k=2, steps=4)
      >>> p = {"Conv_0": jnp.zeros(()), "head": jnp.zeros(())}
      >>> u, _ = tx.update({"Conv_0": jnp.ones(()), "head": jnp.ones(())}, tx.init(p), p)
      >>> print(f"{float(u['Conv_0']):.2f} {float(u['head']):.2f}")
      -0.20 -0.10
    """
    k = _checks.check_int("k", k, low=1)
    cycles = -(-_checks.check_int("steps", steps, low=1) // k)
    fast = _sgd(fast_learning_rate, steps)
    slow = _sgd(slow_learning_rate, cycles)
    return multirate(fast, slow, k, fast_slow_labels)


def budget_data(
    split: Split, batch_size: int, steps: int, seed: int
) -> tuple[Callable[[int], Iterable[dict[str, np.ndarray]]], int]:
    """``fit``'s data for a budget of ``steps``: the batches of a Split, the last epoch cut.

    Epoch ``e`` yields ``optax_multirate.data.batches(split, batch_size, seed=seed,
    epoch=e)``, the last epoch only up to the budget, so that the run ends on a complete
    history row (evaluated like every other epoch) after exactly ``steps`` steps, the run
    :func:`benchmarks.batched.run_batched` makes with ``steps=``.

    Returns:
      ``(data, epochs)`` for ``fit(model, tx, data, epochs=epochs, ...)``.

    Examples:
      >>> s = Split(x=np.zeros((10, 2), np.float32), y=np.zeros(10, np.int32))
      >>> data, epochs = budget_data(s, 4, 5, seed=0)
      >>> epochs, [len(list(data(e))) for e in range(epochs)]
      (3, [2, 2, 1])
    """
    per_epoch = num_batches(split, batch_size)
    steps = _checks.check_int("steps", steps, low=1)
    epochs = -(-steps // per_epoch)

    def data(epoch: int) -> Iterable[dict[str, np.ndarray]]:
        n = min(per_epoch, steps - epoch * per_epoch)
        return itertools.islice(batches(split, batch_size, seed=seed, epoch=epoch), n)

    return data, epochs


# ------------------------------------------------------------------------------ pretraining


class Pretrained(NamedTuple):
    """A pretrained model: its params, its source test accuracy, and how it was made."""

    params: Any
    accuracy: float
    record: dict[str, Any]


def pretrain(
    model: Conv1DNet,
    source: Dataset,
    *,
    epochs: int,
    examples: int | None,
    learning_rate: float,
    batch_size: int,
    seed: int = 0,
) -> Pretrained:
    """Trains ``model`` on the source through :func:`optax_multirate.fit` (plain SGD).

    SGD with momentum, a cosine from ``learning_rate`` to 0 over the run, on the first
    ``examples`` source training signals (all with None); ``epochs=0`` keeps the random init
    (no pretraining). The accuracy is on the source's test split.

    Returns:
      :class:`Pretrained`.
    """
    epochs = _checks.check_int("epochs", epochs, low=0)
    train = source.train
    if examples is not None:
        n = _checks.check_int("examples", examples, low=batch_size, high=len(train))
        train = Split(x=train.x[:n], y=train.y[:n])
    record = {
        "epochs": epochs,
        "source_examples": len(train) if epochs else 0,
        "optimizer": f"sgd, momentum {MOMENTUM}, cosine from {learning_rate} to 0",
        "batch_size": batch_size,
        "seed": seed,
    }
    if epochs == 0:
        params, state = init_model(model, jax.random.PRNGKey(seed), train.x[:1])
        acc = evaluate(model, params, state, source.test)["accuracy"]
        record["steps"] = 0
        return Pretrained(params, float(acc), record)
    steps = epochs * num_batches(train, batch_size)
    res = fit(model, train_all_tx(learning_rate=learning_rate, steps=steps), train,
              epochs=epochs, batch_size=batch_size, seed=seed,
              callbacks=[Evaluate({"source_test": source.test}, every_epochs=epochs),
                         ProgressBar(f"pretrain ({epochs} epochs)")])  # fmt: skip
    record["steps"] = res.steps
    record["train_time_s"] = res.train_time_s
    return Pretrained(res.params, float(res.history[-1]["source_test_accuracy"]), record)
