"""Growing networks: function-preserving width growth, variance transfer, per-subnetwork rates.

Training starts at a fraction of the final width and grows every hidden layer at fixed
boundaries (:class:`GrowthSchedule`). :func:`grow` maps the Flax variables and optimizer state
of stage ``s`` to those of stage ``s + 1``: new units come in cancelling pairs, so the function
is unchanged, and the old blocks are rescaled by variance transfer (VT).
:func:`growth_lr_adaptation` (LRA) scales each element's update by the norm ratio of the stage
it was born in. :class:`GrowthStages` grows the model at the stage boundaries as a callback of
the library's train loop, and :func:`fit_grown` runs a whole grown training with it, one
compilation per stage. Where the paper leaves a choice open, the defaults here are ours;
the docs page (``docs/growing.md``, "Our choices where the paper is silent") lists each one
beside what the sources say.

Submodules, one concept each: ``schedule`` (:class:`GrowthSchedule`), ``widen`` (:func:`grow`:
params, batch-norm statistics and the optimizer state's carry-over), ``generic``
(:func:`grow_variables` and :func:`grow_module`: any Linen or NNX model grown into the wider
twin its user builds, with no naming contract), ``rate_adaptation``
(:func:`growth_lr_adaptation`, :class:`GrowthLRAState`) and ``stages`` (:class:`GrowthStages`,
:func:`fit_grown`, :class:`GrownFitResult`). Every public name is importable from
``optax_multirate.growing``.

References:
  Yuan, Savarese, Maire, `Accelerated Training via Incrementally Growing Neural Networks using
  Variance Transfer and Learning Rate Adaptation <https://arxiv.org/abs/2306.12700>`_, NeurIPS
  2023.
"""

from optax_multirate.growing.generic import grow_module, grow_variables
from optax_multirate.growing.rate_adaptation import GrowthLRAState, growth_lr_adaptation
from optax_multirate.growing.schedule import GrowthSchedule
from optax_multirate.growing.stages import GrownFitResult, GrowthStages, fit_grown
from optax_multirate.growing.widen import grow

__all__ = [
    "GrowthSchedule",
    "GrowthLRAState",
    "growth_lr_adaptation",
    "grow",
    "grow_variables",
    "grow_module",
    "GrowthStages",
    "GrownFitResult",
    "fit_grown",
]
