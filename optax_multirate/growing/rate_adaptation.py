"""Learning-rate adaptation per subnetwork of a grown network (LRA).

:func:`growth_lr_adaptation` scales each element's update by ``r_b = N_b / N_0``, where ``N_b``
is the norm of all kernel elements born in stage ``b``; :class:`GrowthLRAState` records each
element's birth stage, which :func:`~optax_multirate.growing.grow` extends.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_multirate import _checks
from optax_multirate import labels as labels_lib

__all__ = ["GrowthLRAState", "growth_lr_adaptation"]


class GrowthLRAState(NamedTuple):
    """State of :func:`growth_lr_adaptation`.

    Attributes:
      birth: int8 tree shaped like the params (int16 when ``num_stages > 127``): the stage in
        which each element was born. :func:`grow` pads it with ``stage + 1``.
      ratios: f32[S] (f32[L, S] with ``scope="per_layer"``, one row per kernel): the ratios
        ``r_t`` applied by the last update.
      lra_stale: bool[]: recompute the ratios at the next update (``refresh="stage"``).
      sq_norms: f32 shaped like ``ratios``: each stage's squared norm :math:`N_t^2` over the
        kernels when the network last grew (set by ``init`` and by every growth), -1 for a
        stage with no element yet; ``refresh="growth"`` computes its ratios from it.
    """

    birth: Any
    ratios: jax.Array
    lra_stale: jax.Array
    sq_norms: jax.Array


def _is_kernel(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel"


def stage_sums(
    params: Any, birth: Any, num_stages: int, *, per_layer: bool, host: bool = False
) -> tuple[Any, Any]:
    """Per-stage sums of squared kernel elements and element counts.

    Each leaf of ``birth`` is matched to the leaf of ``params`` at the same path (``params``
    may hold more leaves, e.g. when the state lives under ``optax.masked``). ``host=True``
    sums in numpy (float64, nothing compiles: growth runs it once per new shape); otherwise in
    JAX (traceable, inside the train step).

    Returns:
      ``(sq, cnt)``, each f32[S], or f32[L, S] with ``per_layer`` (one row per kernel).
    """
    xp = np if host else jnp

    def segment(values: Any, ids: Any) -> Any:
        if host:
            return np.bincount(ids, weights=values, minlength=num_stages)
        return jax.ops.segment_sum(values, ids, num_segments=num_stages)

    by_path = dict(zip(labels_lib.leaf_paths(params), jax.tree.leaves(params)))
    sqs, cnts = [], []
    for path, b in zip(labels_lib.leaf_paths(birth), jax.tree.leaves(birth)):
        if _is_kernel(path):
            ids = xp.ravel(xp.asarray(b)).astype(xp.int32)
            w2 = xp.square(xp.asarray(by_path[path], xp.float32)).ravel()
            sqs.append(segment(w2, ids))
            cnts.append(segment(xp.ones_like(w2), ids))
    if not per_layer:
        sq, cnt = sum(sqs, xp.zeros(num_stages)), sum(cnts, xp.zeros(num_stages))
    elif sqs:
        sq, cnt = xp.stack(sqs), xp.stack(cnts)
    else:
        sq = cnt = xp.zeros((0, num_stages))
    return sq.astype(xp.float32), cnt.astype(xp.float32)


def sq_norms_of(
    params: Any, birth: Any, num_stages: int, *, per_layer: bool, host: bool = False
) -> Any:
    """:attr:`GrowthLRAState.sq_norms` for ``params`` and ``birth``: -1 where a stage has no
    element (``host`` as in :func:`stage_sums`)."""
    xp = np if host else jnp
    sq, cnt = stage_sums(params, birth, num_stages, per_layer=per_layer, host=host)
    return xp.where(cnt > 0, sq, xp.float32(-1.0)).astype(xp.float32)


def growth_lr_adaptation(
    num_stages: int,
    *,
    refresh: str = "step",
    scope: str = "global",
    apply_to: str = "kernels",
    eps: float = 1e-12,
    clip: tuple[float, float] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Learning-rate adaptation per subnetwork: scales each update by its birth stage's ratio.

    With ``b(e)`` the stage in which element ``e`` was born,

    .. math::
      N_t = \sqrt{\textstyle\sum_{e \in \text{kernels},\, b(e) = t} w_e^2}, \qquad
      r_t = N_t / N_0, \qquad u_e \leftarrow r_{b(e)}\, u_e .

    A stage with no elements gets ``r_t = 1``. Place it after the base optimizer (equivalent to
    PyTorch per-group learning rates), e.g.
    ``chain(add_decayed_weights(5e-4), trace(0.9), scale_by_schedule(cos), this, scale(-1))``.
    ``num_stages`` shapes the state: pass it in ``static_args`` under ``inject_hyperparams``.

    Args:
      num_stages: number of stages ``S`` (>= 1).
      refresh: ``"step"`` (recompute ``r`` every update), ``"stage"`` (freeze ``r`` at the
        first update of each stage; :func:`grow` marks the state stale) or ``"growth"``
        (``r`` from the norms that ``init`` and every growth record in the state: the same
        ratios as ``"stage"``, with no norm computation in the step at all; the network must
        grow through :func:`grow`, :func:`grow_variables` or :func:`grow_module`, which
        record them).
      scope: ``"global"`` (one norm per stage over all kernels) or ``"per_layer"`` (per kernel).
      apply_to: ``"kernels"`` (scale kernel updates only) or ``"all"`` (biases and batch-norm
        leaves follow the stage of their unit; needs ``scope="global"``).
      eps: floor of ``N_0^2`` (> 0).
      clip: optional ``(lo, hi)`` with ``0 < lo <= hi`` bounding each ``r_t``.

    Returns:
      A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Raises:
      TypeError: for an argument of the wrong type (``num_stages`` may be a Python or numpy
        int; ``clip`` must be None or a pair of numbers).
      ValueError: for ``num_stages < 1``, an unknown ``refresh``/``scope``/``apply_to``,
        ``apply_to="all"`` with ``scope="per_layer"``, ``eps <= 0``, a ``clip`` outside
        ``0 < lo <= hi``, and in ``update`` when ``params`` is None.

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = growth_lr_adaptation(2)
      >>> p = {"kernel": jnp.array([3.0, 4.0])}
      >>> s = tx.init(p)
      >>> s = s._replace(birth={"kernel": jnp.array([0, 1], jnp.int8)})
      >>> u, s = tx.update({"kernel": jnp.ones(2)}, s, p)
      >>> print(f"{float(u['kernel'][1]):.4f}")
      1.3333
    """
    num = _checks.check_int("num_stages", num_stages, low=1, static=True)
    _checks.check_choice("refresh", refresh, ("step", "stage", "growth"))
    _checks.check_choice("scope", scope, ("global", "per_layer"))
    _checks.check_choice("apply_to", apply_to, ("kernels", "all"))
    if apply_to == "all" and scope != "global":
        raise ValueError(f"apply_to='all' needs scope='global', got scope={scope!r}")
    _checks.check_real("eps", eps, low=0.0, low_open=True)
    if clip is not None:
        if not (isinstance(clip, (tuple, list)) and len(clip) == 2):
            raise TypeError(f"clip must be None or a pair (lo, hi), got {clip!r}")
        lo, hi = (float(_checks.check_real("clip", c)) for c in clip)
        if not 0 < lo <= hi:
            raise ValueError(f"clip must be None or (lo, hi) with 0 < lo <= hi, got {clip!r}")
    bdtype = jnp.int8 if num <= 127 else jnp.int16

    def init_fn(params: optax.Params) -> GrowthLRAState:
        birth = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), bdtype), params)
        n = sum(map(_is_kernel, labels_lib.leaf_paths(params)))
        shape = (num,) if scope == "global" else (n, num)
        sq_norms = sq_norms_of(params, birth, num, per_layer=scope == "per_layer")
        return GrowthLRAState(birth, jnp.ones(shape, jnp.float32), jnp.asarray(True), sq_norms)

    def ratios_of(sq: jax.Array, cnt: jax.Array) -> jax.Array:
        r = jnp.sqrt(sq) / jnp.sqrt(jnp.maximum(sq[..., :1], eps))
        r = jnp.where(cnt > 0, r, 1.0)
        return r if clip is None else jnp.clip(r, lo, hi)

    def update_fn(
        updates: optax.Updates,
        state: GrowthLRAState,
        params: optax.Params | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, GrowthLRAState]:
        del extra
        if params is None:
            raise ValueError("params must be given to growth_lr_adaptation's update")
        paths = labels_lib.leaf_paths(params)
        b_leaves = jax.tree.leaves(state.birth)

        def fresh() -> jax.Array:
            sq, cnt = stage_sums(params, state.birth, num, per_layer=scope == "per_layer")
            return ratios_of(sq, cnt).reshape(state.ratios.shape)

        if refresh == "growth":  # the norms recorded at the last growth: no reduction here
            known = state.sq_norms >= 0
            ratios = ratios_of(jnp.where(known, state.sq_norms, 0.0), known)
        elif refresh == "stage":  # the norms are computed only on a stage's first step
            ratios = jax.lax.cond(state.lra_stale, fresh, lambda: state.ratios)
        else:
            ratios = fresh()
        out, k = [], 0
        for path, u, b in zip(paths, jax.tree.leaves(updates), b_leaves):
            if _is_kernel(path) or apply_to == "all":
                row = ratios if scope == "global" else ratios[k]
                u = (u * row[b.astype(jnp.int32)]).astype(u.dtype)
                k += _is_kernel(path)
            out.append(u)
        updates = jax.tree.unflatten(jax.tree.structure(updates), out)
        return updates, state._replace(ratios=ratios, lra_stale=jnp.asarray(False))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
