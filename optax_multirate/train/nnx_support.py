"""Flax NNX models in the train step, the evaluation and the loop: split once, merge in the loss.

The step of an NNX module works on the module's split, the direction Flax's own design
takes: ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``, ``jax.grad`` over
``params``, ``nnx.merge`` inside the loss. So the library's phased step differentiates only
the ``nnx.Param`` leaves a phase reads, exactly as for a Linen model:

* ``params`` is an ``nnx.State`` of pure arrays (``nnx.as_pure``), the optimizer's params;
  label trees built from ``nnx.state(model, nnx.Param)`` match it.
* ``model_state`` is the rest, pure too: batch statistics (``nnx.BatchStat``) and the RNG
  streams' keys and counts. It comes back updated from each train step (statistics averaged,
  counts advanced), so dropout draws from the module's own streams, as under
  ``nnx.Optimizer``, and a checkpoint of it resumes them exactly.
* Train and eval mode are two graph definitions taken once from copies of the module put in
  ``.train()`` and ``.eval()`` mode (Dropout's ``deterministic``, BatchNorm's
  ``use_running_average``, and any module attribute of those names); the user's module is
  never changed. Another ``call`` (see :mod:`optax_multirate.train.model`) says otherwise:
  ``None`` calls the module as it is, a keyword name or a callable passes keyword arguments.

The trained values go back into the user's module with ``nnx.update(model, params,
model_state)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

__all__ = ["NNXModel", "is_nnx", "split"]


def is_nnx(model: Any) -> bool:
    """Whether ``model`` is a Flax NNX module."""
    return isinstance(model, nnx.Module)


def split(module: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """``(graphdef, params, model_state)`` of ``module``: its ``nnx.Param`` leaves and the rest,
    both as ``nnx.State`` of pure arrays.

    Examples:
      >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> _, params, rest = split(lin)
      >>> print(sorted(params), type(params["kernel"]).__name__, len(rest))
      ['bias', 'kernel'] ArrayImpl 0
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def _graphdef(module: nnx.Module, mode: bool | None) -> Any:
    """The graph definition of ``module`` in train (True) or eval (False) mode, or as is."""
    if mode is not None:
        module = nnx.clone(module)  # new Variables over the same arrays; the user's is kept
        module.train() if mode else module.eval()
    return nnx.split(module, nnx.Param, ...)[0]


@dataclasses.dataclass(frozen=True)
class NNXModel:
    """How the train step, the evaluation and the loop run an NNX module.

    Equal (and hashed) by its graph definitions and ``call``: two modules of one structure
    share every compiled program.

    Attributes:
      train_def: the graph definition run in train mode.
      eval_def: the graph definition run in eval mode.
      call: ``"train"`` (modes set by ``.train()``/``.eval()``), None (the module as is), a
        keyword name or a callable ``train -> dict`` of keyword arguments of the call.
      module: the module it was made from (its values are the initial params and state).
    """

    train_def: Any
    eval_def: Any
    call: Any
    module: nnx.Module = dataclasses.field(compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, module: nnx.Module, call: Any) -> NNXModel:
        """The runner of ``module`` under ``call`` (already checked)."""
        modes = call == "train"
        train_def = _graphdef(module, True if modes else None)
        eval_def = _graphdef(module, False) if modes else train_def
        return cls(train_def, eval_def, call, module)

    def init(self, rng: Any = None, sample_x: Any = None) -> tuple[nnx.State, nnx.State]:
        """``(params, model_state)`` of the module as it is (``rng`` and ``sample_x`` unused:
        an NNX module holds its values from construction)."""
        del rng, sample_x
        return split(self.module)[1:]

    def apply(
        self, params: Any, model_state: Any, x: Any, *, train: bool, rng: Any = None
    ) -> tuple[Any, Any]:
        """``(outputs, model_state)``; in train mode ``model_state`` comes back updated.

        ``rng`` is unused: dropout draws from the module's RNG streams, whose keys and counts
        are in ``model_state``.
        """
        from optax_multirate.train.model import call_kwargs  # model.py dispatches here

        del rng
        graphdef = self.train_def if train else self.eval_def
        # pure arrays make new Variables here (Variables passed in belong to an outer trace)
        module = nnx.merge(graphdef, nnx.as_pure(params), nnx.as_pure(model_state))
        kwargs = {} if self.call == "train" else call_kwargs(self.call, train)
        outputs = module(x, **kwargs)
        if not train:
            return outputs, model_state
        return outputs, split(module)[2]
