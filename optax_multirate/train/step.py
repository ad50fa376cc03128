"""The train step: a :class:`~optax_multirate.phases.PhasedStep` around a model's loss.

Any optax transformation works, and a phased one (``freeze_schedule``, the methods of this
library) gets only the gradients it reads. With a ``mesh`` the step is data-parallel: each
batch is sharded over the mesh's ``"data"`` axis and :meth:`TrainStep.place` replicates the
state (see :mod:`optax_multirate.parallel`).

A Flax NNX module trains through its split: the step's ``params`` are its ``nnx.Param``
leaves and its ``model_state`` the rest (batch statistics, RNG keys and counts), both
``nnx.State`` of pure arrays from :func:`~optax_multirate.train.init_model`; the gradient is
taken over ``params`` with the module merged inside the loss (see
:mod:`optax_multirate.train.nnx_support`), so a phased transformation saves the same
backward work as for a Linen model. ``nnx.update(model, params, model_state)`` puts the
trained values back into the module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import nnx

from optax_multirate import _checks, parallel
from optax_multirate.phases import PhasedStep
from optax_multirate.train import model as model_lib

__all__ = ["TrainStep", "make_train_step", "mask_name"]

Metrics = dict[str, jax.Array]


class TrainStep:
    """A jitted train step of a Flax model over any optax transformation.

    ``step(params, opt_state, model_state, batch, rng, **extra)`` returns
    ``(params, opt_state, model_state, metrics)``. ``extra`` (e.g. ``value=``) goes to
    ``tx.update``, as do the in-graph extras of ``extra_args_fn(metrics)``. Build it with
    :func:`make_train_step`, which documents the arguments.

    Attributes:
      model: the Flax model (Linen or NNX).
      tx: the optax transformation it was built for.
      loss: the user loss (None: cross-entropy and accuracy).
      call: how the model is told train or eval mode.
      mesh: the device mesh of a data-parallel step, or None.
      phased: the underlying :class:`~optax_multirate.phases.PhasedStep` (``masks``,
        ``last_mask``, ``compile_time_s``, ``num_compiles``, ``flops``).
    """

    def __init__(
        self,
        model: nn.Module | nnx.Module,
        tx: optax.GradientTransformation,
        *,
        loss: model_lib.Loss | None = None,
        call: model_lib.Call = "train",
        dispatch: str = "host",
        extra_args_fn: Callable[[Metrics], Mapping[str, Any]] | None = None,
        jit: bool = True,
        mesh: jax.sharding.Mesh | None = None,
    ):
        _checks.check_transformation("tx", tx)
        _checks.check_choice("dispatch", dispatch, ("host", "switch", "full"))
        _checks.check_callable("extra_args_fn", extra_args_fn, optional=True)
        _checks.check_bool("jit", jit)
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {mesh!r}")
        adapted = None
        if extra_args_fn is not None:

            def adapted(value, aux):
                del value
                return extra_args_fn(aux[1])

        self.model = model
        self.tx = tx
        self.loss = model_lib.check_loss(loss)
        self.call = model_lib.check_call(call)
        self.mesh = mesh
        self.phased = PhasedStep(
            model_lib.classification_loss(model, loss=self.loss, call=self.call),
            tx,
            has_aux=True,
            extra_args_fn=adapted,
            dispatch=dispatch,
            jit=jit,
        )

    def place(self, tree: Any) -> Any:
        """``tree`` replicated on the mesh (leaves already sharded on it kept); as is without."""
        return tree if self.mesh is None else parallel.place(tree, self.mesh)

    def shard(self, batch: Any) -> Any:
        """``batch`` sharded over the mesh's ``"data"`` axis; as is without a mesh.

        Raises:
          ValueError: if a leading axis does not divide by the mesh's devices.
        """
        return batch if self.mesh is None else parallel.shard_batch(batch, self.mesh)

    def __call__(
        self,
        params: Any,
        opt_state: Any,
        model_state: Any,
        batch: Any,
        rng: jax.typing.ArrayLike,
        **extra: Any,
    ) -> tuple[Any, Any, Any, Metrics]:
        out = self.phased(params, opt_state, model_state, self.shard(batch), rng, **extra)
        model_state, metrics = out.aux
        return out.params, out.opt_state, model_state, metrics


def make_train_step(
    model: nn.Module | nnx.Module,
    tx: optax.GradientTransformation,
    *,
    loss: model_lib.Loss | None = None,
    call: model_lib.Call = "train",
    dispatch: str = "host",
    extra_args_fn: Callable[[Metrics], Mapping[str, Any]] | None = None,
    jit: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainStep:
    """Builds the jitted train step of ``model`` under ``tx``.

    The step is ``step(params, opt_state, model_state, batch, rng, **extra) -> (params,
    opt_state, model_state, metrics)``, with ``params`` and ``model_state`` from
    :func:`~optax_multirate.train.init_model` and ``opt_state = tx.init(params)``. For an NNX
    module these are the pure ``nnx.State`` of its ``nnx.Param`` leaves and of the rest, and
    ``rng`` is unused (dropout draws from the module's own RNG streams, whose counts are in
    ``model_state``); the module itself is not changed (``nnx.update(model, params,
    model_state)`` puts the trained values back).

    Args:
      model: a Flax Linen or NNX module.
      tx: any optax transformation (phased or not).
      loss: ``loss(outputs, batch) -> scalar`` or ``-> (scalar, metrics)``; None: softmax
        cross-entropy with integer labels, plus ``accuracy`` (see
        :func:`~optax_multirate.train.classification_loss`).
      call: how the model is told train mode: ``"train"`` (``train=True``; for an NNX
        module, the modes ``model.train()`` sets, on a copy), another keyword name, None (no
        flag: an NNX module as it is) or ``call(train) -> dict`` of keyword arguments.
      dispatch: ``"host"``, ``"switch"`` or ``"full"``; see
        :class:`~optax_multirate.phases.PhasedStep`.
      extra_args_fn: ``metrics -> dict`` of in-graph extra keyword arguments for
        ``tx.update``, e.g. ``lambda m: {"value": m["loss"]}``.
      jit: compile (False runs eagerly, for debugging and equality tests).
      mesh: run data-parallel on this mesh (e.g. ``parallel.data_mesh()``): each batch is
        sharded over its ``"data"`` axis (its size must divide by the devices); place the
        state with :meth:`TrainStep.place` (replicated; leaves already sharded on the mesh
        keep their sharding). The results equal a single-device run's within float
        tolerance; see ``docs/scaling.md``.

    Returns:
      A :class:`TrainStep`.

    Raises:
      TypeError: for a model that is no Flax module, a ``tx`` that is not an optax
        transformation, a non-callable ``loss`` or ``extra_args_fn``, a bad ``call``, or a
        ``mesh`` that is not a Mesh.
      ValueError: for an unknown ``dispatch``.

    Examples:
      >>> import numpy as np, optax
      >>> from optax_multirate.models import MLP
      >>> from optax_multirate.train import init_model
      >>> m, tx = MLP((4,), num_classes=2), optax.sgd(0.1)
      >>> p, s = init_model(m, jax.random.PRNGKey(0), np.zeros((1, 3), np.float32))
      >>> step = make_train_step(m, tx)
      >>> batch = {"x": np.ones((8, 3), np.float32), "y": np.zeros(8, np.int32)}
      >>> p, o, s, metrics = step(p, tx.init(p), s, batch, jax.random.PRNGKey(0))
      >>> print(sorted(metrics), step.phased.num_compiles)
      ['accuracy', 'loss'] 1

      An NNX module, through its split:

      >>> from flax import nnx
      >>> lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> p, s = init_model(lin)
      >>> step = make_train_step(lin, tx)
      >>> p, o, s, metrics = step(p, tx.init(p), s, batch, jax.random.PRNGKey(0))
      >>> nnx.update(lin, p, s)                         # the trained values into the module
      >>> bool((lin.kernel[...] == p["kernel"]).all())
      True
    """
    return TrainStep(
        model,
        tx,
        loss=loss,
        call=call,
        dispatch=dispatch,
        extra_args_fn=extra_args_fn,
        jit=jit,
        mesh=mesh,
    )


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
