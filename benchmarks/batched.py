"""The batched runner of the benchmarks' selection: many small runs at once under ``jax.vmap``.

Selection tries every configuration of an arm's grid on two seeds; one run at a time that is
most of a benchmark's time on two cores. :func:`run_batched` trains every (configuration, seed)
pair of a grid in one program per set of non-float hyperparameters: float hyperparameters go
through ``optax.inject_hyperparams`` and are vmapped with the seeds. A phased step cannot be
vmapped, so each step takes the full gradient; the library's methods ignore the gradients they
do not read with ``jnp.where``, so the numbers are those of the phased step. Runs follow
:func:`optax_multirate.fit`'s seed rules for the init, the batch order and dropout.

Where it pays: MLPs. On XLA CPU a convolutional network trained inside ``lax.scan`` ran about
10 times slower per step than the same step unrolled (1,964 ms against 190 ms for the baseline
CNN, measured on this project's 2-core machine under load), and vmapping a convolution over
runs made it a grouped convolution that cost more than the runs one at a time (4 runs: 1,866
ms per step against 71 ms for one). So the benchmarks select convolutional arms one run at a
time through :func:`optax_multirate.fit`, and MLP arms here.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.protocol import RunOutcome, _seeds, is_diverged
from optax_multirate import _checks
from optax_multirate.data import Split, epoch_arrays, num_batches

__all__ = ["BatchedResult", "run_batched"]

logger = logging.getLogger(__name__)


class BatchedResult(NamedTuple):
    """What :func:`run_batched` returns, aligned with its ``grid`` and ``seeds``.

    Attributes:
      grid: the configurations.
      seeds: the seeds.
      val_accuracy: ``(configs, seeds)`` final-epoch validation accuracy.
      train_loss: ``(configs, seeds, epochs)`` mean training loss of each epoch (the last one
        over the steps it ran, under a step budget).
      diverged: ``(configs, seeds)`` :func:`is_diverged`.
      programs: step programs compiled (one per set of non-float hyperparameters).
    """

    grid: list[dict[str, Any]]
    seeds: list[int]
    val_accuracy: np.ndarray
    train_loss: np.ndarray
    diverged: np.ndarray
    programs: int

    def outcome(self, config: Mapping[str, Any], seed: int) -> RunOutcome:
        """The outcome of one run, by configuration and seed: a ``run`` for :func:`select`."""
        i, j = self.grid.index(dict(config)), self.seeds.index(seed)
        return RunOutcome(float(self.val_accuracy[i, j]), tuple(self.train_loss[i, j].tolist()))


def _is_float(v: Any) -> bool:
    return isinstance(v, (float, np.floating))


def _injected(make_tx: Callable[..., Any], static: Mapping[str, Any], names: Sequence[str]):
    """``inject_hyperparams`` over ``make_tx`` with ``static`` bound and ``names`` vmappable."""

    def factory(**floats):
        return make_tx(**static, **floats)

    kw = inspect.Parameter.KEYWORD_ONLY
    factory.__signature__ = inspect.Signature([inspect.Parameter(n, kw) for n in names])
    return optax.inject_hyperparams(factory)


def _train_program(loss_fn, make_tx, static, names, extra_args_fn):
    """``(hp, params, model_state, idx, keys, x, y) -> (params, model_state, losses)``."""
    factory = _injected(make_tx, static, names)

    def one(hp, params, model_state, idx, keys, x, y):
        tx = factory(**hp)

        def step(carry, inp):
            p, ms, s = carry
            b, key = inp
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, aux), g = grad_fn(p, ms, {"x": x[b], "y": y[b]}, key)
            extra = {} if extra_args_fn is None else extra_args_fn(loss, aux)
            u, s = tx.update(g, s, p, **extra)
            return (optax.apply_updates(p, u), aux[0], s), loss

        (p, ms, _), losses = jax.lax.scan(step, (params, model_state, tx.init(params)), (idx, keys))
        return p, ms, losses

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None)))


def _eval_program(model):
    """``(params, model_state, xs, ys, weights) -> correct count``, vmapped over runs."""

    def one(p, ms, xs, ys, ws):
        def body(total, inp):
            x, y, w = inp
            logits = model.apply({"params": p, **ms}, x, train=False)
            return total + jnp.sum((jnp.argmax(logits, -1) == y) * w), None

        return jax.lax.scan(body, jnp.zeros([], jnp.float32), (xs, ys, ws))[0]

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None)))


def _padded_batches(split: Split, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(split)
    size = min(size, n)
    pad = -n % size
    x = np.concatenate([split.x, np.zeros((pad, *split.x.shape[1:]), split.x.dtype)])
    y = np.concatenate([split.y, np.zeros(pad, split.y.dtype)])
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    shape = (-1, size)
    return x.reshape(*shape, *x.shape[1:]), y.reshape(shape), w.reshape(shape)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def run_batched(
    model: Any,
    make_tx: Callable[..., optax.GradientTransformation],
    grid: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    train: Split,
    validation: Split,
    *,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    loss_fn: Callable[..., Any] | None = None,
    extra_args_fn: Callable[[jax.Array, Any], Mapping[str, Any]] | None = None,
    chunk: int | None = None,
    eval_batch_size: int = 1000,
) -> BatchedResult:
    """Trains every (configuration, seed) pair at once under ``jax.vmap``: selection runs.

    Each run is the run :func:`optax_multirate.fit` makes for that seed: init from
    ``PRNGKey(seed)``, the batches of ``optax_multirate.data.batches(train, batch_size,
    seed=seed, epoch=e)``, dropout keys ``split(fold_in(PRNGKey(seed), e), steps_per_epoch)``,
    training for ``epochs`` epochs or ``steps`` steps (``lax.scan`` over steps), then accuracy
    on ``validation`` in eval mode.

    Float hyperparameters of a configuration (Python or numpy floats: learning rates, ...) go
    through ``optax.inject_hyperparams``, so configurations that differ only in them share
    one program and are vmapped together with the seeds. Any other value (an int that shapes
    the state, a string, a bool) is bound as it is: each distinct set of them is a separate
    program. A phased train step cannot be vmapped, so every step here takes the full
    gradient and calls ``tx.update`` (the same numbers: the methods mask the gradients a phase
    does not read with ``jnp.where``; only the saving in time is lost).

    Args:
      model: a Flax linen classifier ``model(x, train=...) -> logits``.
      make_tx: ``make_tx(**config) -> optax transformation``; its float arguments may be
        traced.
      grid: the configurations (dicts of JSON values).
      seeds: the seeds, each run once per configuration.
      train: the training split (without validation).
      validation: the validation split.
      batch_size: examples per step.
      epochs: epochs per run; give this or ``steps``.
      steps: steps per run (a budget; the last epoch may be partial).
      loss_fn: ``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))``
        (default: ``optax_multirate.classification_loss(model)``).
      extra_args_fn: ``(loss, aux) -> dict`` of extra keyword arguments for ``tx.update``
        (e.g. ``value=``).
      chunk: runs per vmapped call (None: all runs of a program at once); bounds memory.
      eval_batch_size: validation examples per forward pass.

    Returns:
      A :class:`BatchedResult`.

    Raises:
      ValueError: for an empty grid or seeds, both or neither of ``epochs`` and ``steps``,
        or a bad ``batch_size``.
    """
    import optax_multirate as om

    grid, seeds = [dict(c) for c in grid], _seeds("seeds", seeds)
    if not grid:
        raise ValueError("grid must hold at least one configuration, got none")
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs and steps, got {epochs!r} and {steps!r}")
    _checks.check_int("chunk", chunk, low=1, optional=True)
    per_epoch = num_batches(train, batch_size)
    total = per_epoch * _checks.check_int("epochs", epochs, low=1) if steps is None else steps
    total = _checks.check_int("steps", total, low=1)
    loss_fn = om.classification_loss(model) if loss_fn is None else loss_fn
    inputs = {s: _seed_inputs(model, train, s, batch_size, total) for s in seeds}
    evaluate, val = _eval_program(model), _padded_batches(validation, eval_batch_size)
    acc = np.zeros((len(grid), len(seeds)))
    losses = np.zeros((len(grid), len(seeds), total))
    groups = _programs(grid)
    for names, members in groups:
        static = {k: v for k, v in grid[members[0]].items() if k not in names}
        program = _train_program(loss_fn, make_tx, static, names, extra_args_fn)
        runs = [(i, j) for i in members for j in range(len(seeds))]
        width = min(chunk or len(runs), len(runs))
        for at in range(0, len(runs), width):
            part = runs[at : at + width]
            part = part + [part[-1]] * (width - len(part))  # fixed width: one compile
            hp = {n: jnp.asarray([grid[i][n] for i, _ in part], jnp.float32) for n in names}
            got = [inputs[seeds[j]] for _, j in part]
            args = [_stack([g[k] for g in got]) for k in range(4)]
            params, ms, step_losses = program(hp, *args, train.x, train.y)
            correct = np.asarray(evaluate(params, ms, *val))
            for r, (i, j) in enumerate(part[: len(runs) - at]):
                acc[i, j], losses[i, j] = correct[r] / len(validation), step_losses[r]
    ends = range(per_epoch, total + per_epoch, per_epoch)
    epoch_loss = np.stack([losses[..., e - per_epoch : e].mean(-1) for e in ends], -1)
    p, ms = inputs[seeds[0]][:2]
    x1 = jnp.asarray(train.x[:1])
    logits = jax.eval_shape(lambda p, ms: model.apply({"params": p, **ms}, x1, train=False), p, ms)
    diverged = np.array([[is_diverged(x, logits.shape[-1]) for x in row] for row in epoch_loss])
    return BatchedResult(grid, seeds, acc, epoch_loss, diverged, len(groups))


def _seed_inputs(model: Any, train: Split, seed: int, batch_size: int, total: int) -> tuple:
    """``(params, model_state, batch indices (total, batch), dropout keys (total, 2))``.

    The rules of :func:`optax_multirate.fit`: init from ``PRNGKey(seed)``, epoch ``e``'s batch
    order from ``optax_multirate.data.epoch_arrays``, its step keys from
    ``split(fold_in(PRNGKey(seed), e), steps_per_epoch)``.
    """
    import optax_multirate as om

    per_epoch = num_batches(train, batch_size)
    index = Split(x=np.arange(len(train)), y=np.zeros(len(train), np.int32))
    base = jax.random.PRNGKey(seed)
    epochs = range(-(-total // per_epoch))
    idx = [epoch_arrays(index, batch_size, seed=seed, epoch=e)["x"] for e in epochs]
    keys = [np.asarray(jax.random.split(jax.random.fold_in(base, e), per_epoch)) for e in epochs]
    params, model_state = om.init_model(model, base, train.x[:1])
    return params, model_state, np.concatenate(idx)[:total], np.concatenate(keys)[:total]


def _programs(grid: Sequence[Mapping[str, Any]]) -> list[tuple[list[str], list[int]]]:
    """``(float names, config indices)`` per program: configs alike but for float values."""
    groups: dict[str, tuple[list[str], list[int]]] = {}
    for i, c in enumerate(grid):
        key = repr(sorted((k, "float" if _is_float(v) else repr(v)) for k, v in c.items()))
        names = sorted(k for k, v in c.items() if _is_float(v))
        groups.setdefault(key, (names, []))[1].append(i)
    return list(groups.values())
