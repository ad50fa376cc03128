"""Growing networks: function-preserving width growth, variance transfer, per-subnetwork rates.

Training starts at a fraction of the final width and grows every hidden layer at fixed
boundaries (:class:`GrowthSchedule`). :func:`grow` maps the Flax variables and optimizer state
of stage ``s`` to those of stage ``s + 1``:

* **pairing**: new output slots of a layer come as a duplicated block ``[V; V]`` and new input
  slots of its consumer as ``[Z, -Z]``, so the two copies cancel and the function is unchanged;
* **variance transfer** (VT): the old block of every layer whose fan-in grows is scaled by
  ``s = sqrt(fan_in_old / fan_in_new)``; batch-norm running statistics follow (mean by ``s``,
  variance by ``s**2``); without batch norm the activations carry the product of the scales and
  the head divides it back out (``exact=True``), so logits are unchanged to float precision;
* the optimizer state is rebuilt with ``optimizer.init(new_params)`` and the old values carried
  over leaf by leaf (``momentum="reset"``: zeros in grown leaves; ``"carry"``: old block plus
  zeros; integer birth ids: old block plus ``stage + 1``).

:func:`growth_lr_adaptation` (LRA) scales each element's update by ``r_b = N_b / N_0``, where
``N_b`` is the norm of all kernel elements born in stage ``b``. :func:`fit_grown` runs a whole
grown training with the library's train step, one compilation per stage. The spec note is
``shared/spec/growing.md``; the choices it marks as ours are the defaults here.

References:
  Yuan, Savarese, Maire, `Accelerated Training via Incrementally Growing Neural Networks using
  Variance Transfer and Learning Rate Adaptation <https://arxiv.org/abs/2306.12700>`_, NeurIPS
  2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_multirate import labels as labels_lib
from optax_multirate import train as train_lib
from optax_multirate.data import Split, batches, num_batches

__all__ = [
    "GrowthSchedule",
    "GrowthLRAState",
    "growth_lr_adaptation",
    "grow",
    "GrownFitResult",
    "fit_grown",
]


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ------------------------------------------------------------------------------- schedule


@dataclasses.dataclass(frozen=True)
class GrowthSchedule:
    """Widths and epochs of each stage of a grown training.

    Stage ``t`` uses the width multiplier ``m_t = min(1, m0 * (1 + p_c) ** t)``; every layer's
    increment is rounded up to an even number (``even=True``, so new units come in pairs; the
    first width is chosen with the parity of the final one) and the last stage is exactly
    ``final_widths``. Stage epochs: ``T_0 = t0``, ``T_t = T_{t-1} + round(p_t * T_{t-1})``
    (halves rounded up), and the last stage gets what remains of ``total_epochs``.

    Attributes:
      final_widths: per-layer widths of the full model.
      total_epochs: epoch budget of the whole training.
      m0: width multiplier of stage 0, in (0, 1].
      p_c: width growth rate per stage (> 0).
      t0: epochs of stage 0 (int >= 1).
      p_t: epoch growth rate per stage (>= 0); ``None`` means ``p_c``.
      even: round increments up to even numbers (needed by ``grow(..., pairing=True)``).
      widths: ``widths[t]`` is the per-layer widths of stage ``t`` (derived).
      epochs: ``epochs[t]`` is the number of epochs of stage ``t`` (derived).

    Raises:
      ValueError: for ``m0`` outside (0, 1], ``p_c <= 0``, ``t0 < 1``, ``p_t < 0``, bad widths,
        or early stages whose epochs sum to ``>= total_epochs`` (the plan overflows the budget).

    Examples:
      >>> s = GrowthSchedule((16, 32, 64), total_epochs=16, m0=0.25, p_c=0.5, t0=1)
      >>> s.num_stages, s.epochs
      (5, (1, 2, 3, 5, 5))
      >>> [w[0] for w in s.widths]
      [4, 6, 10, 14, 16]
    """

    final_widths: tuple[int, ...]
    total_epochs: int
    m0: float = 0.25
    p_c: float = 0.2
    t0: int = 8
    p_t: float | None = None
    even: bool = True
    widths: tuple[tuple[int, ...], ...] = dataclasses.field(init=False)
    epochs: tuple[int, ...] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        fw = tuple(self.final_widths)
        if not fw or not all(_is_int(w) and w >= 1 for w in fw):
            raise ValueError(f"final_widths must be positive ints, got {self.final_widths!r}")
        if not (_is_int(self.total_epochs) and self.total_epochs >= 1):
            raise ValueError(f"total_epochs must be an int >= 1, got {self.total_epochs!r}")
        if not (isinstance(self.m0, (int, float)) and 0 < self.m0 <= 1):
            raise ValueError(f"m0 must be in (0, 1], got {self.m0!r}")
        if not (isinstance(self.p_c, (int, float)) and self.p_c > 0):
            raise ValueError(f"p_c must be > 0, got {self.p_c!r}")
        if not (_is_int(self.t0) and self.t0 >= 1):
            raise ValueError(f"t0 must be an int >= 1, got {self.t0!r}")
        p_t = self.p_c if self.p_t is None else self.p_t
        if not (isinstance(p_t, (int, float)) and p_t >= 0):
            raise ValueError(f"p_t must be >= 0, got {self.p_t!r}")
        steps = max(0, math.ceil(math.log(1 / self.m0) / math.log1p(self.p_c) - 1e-9))
        widths = []
        for c in fw:
            w = max(1, _half_up(c * self.m0))
            if self.even and (c - w) % 2:  # then w < c: start with the final width's parity
                w += 1
            col = [w]
            for t in range(1, steps):
                inc = max(0, math.ceil(c * min(1.0, self.m0 * (1 + self.p_c) ** t) - w - 1e-9))
                if self.even:
                    inc += inc % 2
                w = min(c, w + inc)
                col.append(w)
            if steps:
                col.append(c)
            widths.append(col)
        epochs = [self.t0]
        for _ in range(1, steps):
            epochs.append(epochs[-1] + _half_up(p_t * epochs[-1]))
        epochs = epochs[:steps]
        if sum(epochs) >= self.total_epochs:
            raise ValueError(
                f"total_epochs={self.total_epochs} is too small: the {steps} early stages take "
                f"{epochs} = {sum(epochs)} epochs and the full-width stage needs at least one "
                "(lower t0 or p_t, or raise total_epochs)"
            )
        epochs.append(self.total_epochs - sum(epochs))
        object.__setattr__(self, "final_widths", fw)
        object.__setattr__(self, "widths", tuple(zip(*widths)))
        object.__setattr__(self, "epochs", tuple(epochs))

    @property
    def num_stages(self) -> int:
        """Number of stages ``S`` (``S - 1`` growth steps)."""
        return len(self.epochs)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Epochs at which stages ``1 .. S-1`` start."""
        return tuple(int(x) for x in np.cumsum(self.epochs)[:-1])

    def multipliers(self) -> tuple[float, ...]:
        """Mean over layers of ``widths[t] / final_widths``, per stage."""
        fw = np.asarray(self.final_widths, float)
        return tuple(float(np.mean(np.asarray(w) / fw)) for w in self.widths)

    def predicted_cost_ratio(self, power: float = 2.0) -> float:
        """Predicted compute of the grown training over the fixed one: ``sum_t T_t m_t^power / T``.

        ``power=2`` for layers whose cost scales with both widths (hidden conv and dense layers).
        """
        cost = sum(e * m**power for e, m in zip(self.epochs, self.multipliers()))
        return cost / self.total_epochs


# ----------------------------------------------------------------------- rate adaptation


class GrowthLRAState(NamedTuple):
    """State of :func:`growth_lr_adaptation`.

    Attributes:
      birth: int8 tree shaped like the params (int16 when ``num_stages > 127``): the stage in
        which each element was born. :func:`grow` pads it with ``stage + 1``.
      ratios: f32[S] (f32[L, S] with ``scope="per_layer"``, one row per kernel): the ratios
        ``r_t`` applied by the last update.
      lra_stale: bool[]: recompute the ratios at the next update (``refresh="stage"``).
    """

    birth: Any
    ratios: jax.Array
    lra_stale: jax.Array


def _is_kernel(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel"


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
      refresh: ``"step"`` (recompute ``r`` every update) or ``"stage"`` (freeze ``r`` at the
        first update of each stage; :func:`grow` marks the state stale).
      scope: ``"global"`` (one norm per stage over all kernels) or ``"per_layer"`` (per kernel).
      apply_to: ``"kernels"`` (scale kernel updates only) or ``"all"`` (biases and batch-norm
        leaves follow the stage of their unit; needs ``scope="global"``).
      eps: floor of ``N_0^2`` (> 0).
      clip: optional ``(lo, hi)`` with ``0 < lo <= hi`` bounding each ``r_t``.

    Returns:
      A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Raises:
      ValueError: for ``num_stages < 1``, an unknown ``refresh``/``scope``/``apply_to``,
        ``eps <= 0``, a bad ``clip``, and in ``update`` when ``params`` is None.

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
    if not (_is_int(num_stages) and num_stages >= 1):
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if refresh not in ("step", "stage"):
        raise ValueError(f"refresh must be 'step' or 'stage', got {refresh!r}")
    if scope not in ("global", "per_layer"):
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    if apply_to not in ("kernels", "all"):
        raise ValueError(f"apply_to must be 'kernels' or 'all', got {apply_to!r}")
    if apply_to == "all" and scope != "global":
        raise ValueError(f"apply_to='all' needs scope='global', got scope={scope!r}")
    if not isinstance(eps, jax.core.Tracer) and not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if clip is not None and not (
        isinstance(clip, tuple) and len(clip) == 2 and 0 < clip[0] <= clip[1]
    ):
        raise ValueError(f"clip must be None or (lo, hi) with 0 < lo <= hi, got {clip!r}")
    num = num_stages
    bdtype = jnp.int8 if num <= 127 else jnp.int16

    def init_fn(params: optax.Params) -> GrowthLRAState:
        birth = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), bdtype), params)
        n = sum(map(_is_kernel, labels_lib.leaf_paths(params)))
        shape = (num,) if scope == "global" else (n, num)
        return GrowthLRAState(birth, jnp.ones(shape, jnp.float32), jnp.asarray(True))

    def ratios_of(sq: jax.Array, cnt: jax.Array) -> jax.Array:
        r = jnp.sqrt(sq) / jnp.sqrt(jnp.maximum(sq[..., :1], eps))
        r = jnp.where(cnt > 0, r, 1.0)
        return r if clip is None else jnp.clip(r, clip[0], clip[1])

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
            sqs, cnts = [], []
            for path, w, b in zip(paths, jax.tree.leaves(params), b_leaves):
                if _is_kernel(path):
                    ids = b.ravel().astype(jnp.int32)
                    w2 = jnp.square(w.astype(jnp.float32)).ravel()
                    sqs.append(jax.ops.segment_sum(w2, ids, num_segments=num))
                    cnts.append(jax.ops.segment_sum(jnp.ones_like(w2), ids, num_segments=num))
            if scope == "global":
                zero = jnp.zeros((num,), jnp.float32)
                return ratios_of(sum(sqs, zero), sum(cnts, zero))
            if not sqs:
                return state.ratios
            return ratios_of(jnp.stack(sqs), jnp.stack(cnts)).reshape(state.ratios.shape)

        if refresh == "stage":  # the norms are computed only on a stage's first step
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
        return updates, GrowthLRAState(state.birth, ratios, jnp.asarray(False))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------- growth


@dataclasses.dataclass
class _Layer:
    """One layer of the naming contract: a kernel, its bias, the batch norm after it."""

    path: tuple[str, ...]  # module path in params
    src: str  # stream it reads
    dst: str  # stream it writes ("" for the head)
    bn: tuple[str, ...] | None = None


_BLOCK_NAMES = {"Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1", "proj", "proj_bn"}


def _num(name: str, prefix: str) -> int | None:
    m = re.fullmatch(prefix + r"_(\d+)", name)
    return int(m.group(1)) if m else None


def _graph(params: dict) -> list[_Layer]:
    """Layers in forward order from the naming contract of ``optax_multirate.models``."""
    names = set(params)
    layers: list[_Layer] = []
    if "stem" in names:  # ResNet
        layers.append(_Layer(("stem",), "in", "r0", ("stem_bn",) if "stem_bn" in names else None))
        cur, blocks = (
            "r0",
            sorted(
                (n for n in names if _num(n, "ResBlock") is not None),
                key=lambda n: _num(n, "ResBlock"),
            ),
        )
        for b, name in enumerate(blocks):
            blk = params[name]
            out = f"r{b + 1}" if "proj" in blk else cur
            for conv, src, dst, bn in (
                ("Conv_0", cur, f"{name}.0", "BatchNorm_0"),
                ("Conv_1", f"{name}.0", out, "BatchNorm_1"),
                ("proj", cur, out, "proj_bn"),
            ):
                if conv in blk:
                    has_bn = bn in blk
                    layers.append(_Layer((name, conv), src, dst, (name, bn) if has_bn else None))
            stray = sorted(set(blk) - _BLOCK_NAMES)
            if stray:
                raise ValueError(
                    f"variables: {name}/{stray[0]} does not follow the naming "
                    "contract of optax_multirate.models"
                )
            cur = out
        known = {"stem", "stem_bn", "head", *blocks}
    else:  # MLP / CNN: Conv_i, then Dense_i, then head; BatchNorm_i follows Conv_i (CNN)
        # or Dense_i (MLP)

        def numbered(prefix: str) -> list[str]:
            return sorted((n for n in names if _num(n, prefix) is not None),
                          key=lambda n: _num(n, prefix))  # fmt: skip

        convs, dense = numbered("Conv"), numbered("Dense")
        bns = {n: "BatchNorm_" + n.rsplit("_", 1)[1] for n in (convs or dense)}
        cur = "in"
        for i, name in enumerate(convs + dense):
            bn = bns.get(name)
            layers.append(_Layer((name,), cur, f"s{i}", (bn,) if bn in names else None))
            cur = f"s{i}"
        known = {"head", *convs, *dense, *bns.values()}
    if "head" not in names:
        raise ValueError(
            "variables: no 'head' layer; grow needs the naming contract of optax_multirate.models"
        )
    layers.append(_Layer(("head",), cur, ""))
    stray = sorted(names - known)
    if stray:
        raise ValueError(
            f"variables: params {stray!r} do not follow the naming contract of "
            "optax_multirate.models (see its module docstring)"
        )
    return layers


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _rng(key: jax.Array, index: int) -> np.random.Generator:
    """A numpy generator seeded by ``(key, index)`` (no XLA compile per shape, as a draw with
    ``jax.random`` would need on every new shape)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng([*np.asarray(key, np.uint32).ravel().tolist(), index])


def _draw(key: jax.Array, index: int, shape: tuple[int, ...], new_init: Any) -> np.ndarray:
    """New entries: lecun normal at the new fan-in (Flax's default), ``mup_sq`` or a callable."""
    if callable(new_init):
        return np.array(new_init(jax.random.fold_in(key, index), shape, jnp.float32), np.float32)
    rng = _rng(key, index)
    z = rng.standard_normal(shape)
    if new_init == "mup_sq":
        return (z / shape[-2]).astype(np.float32)
    bad = np.abs(z) > 2
    while bad.any():  # truncated to [-2, 2] std, as jax.nn.initializers.lecun_normal
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2
    fan_in = int(np.prod(shape[:-1]))
    return (z * np.sqrt(1.0 / fan_in) / 0.87962566103423978).astype(np.float32)


def _grow_kernel(
    old: np.ndarray, shape: tuple[int, ...], mult: float, key: jax.Array, index: int, cfg: dict
) -> np.ndarray:
    """New kernel: drawn, paired (``[Z, -Z]`` inputs, ``[V; V]`` outputs), old block * mult."""
    i0, o0 = old.shape[-2:]
    i1, o1 = shape[-2:]
    new = _draw(key, index, shape, cfg["new_init"])
    if cfg["pairing"]:
        hi, ho = (i1 - i0) // 2, (o1 - o0) // 2
        new[..., i0 + hi :, :] = -new[..., i0 : i0 + hi, :]
        new[..., o0 + ho :] = new[..., o0 : o0 + ho]
        if cfg["pair_noise"] and ho:
            std = cfg["pair_noise"] * float(np.std(new[..., o0 : o0 + ho]))
            noise = _rng(key, (1 << 30) + index).standard_normal(new[..., o0 + ho :].shape)
            new[..., o0 + ho :] += (std * noise).astype(np.float32)
    else:
        new[..., i0:, :] = 0.0  # zero fan-out of new units (GradMax-style)
    new[..., :i0, :o0] = mult * old
    return new


def _pad(old: np.ndarray, shape: tuple[int, ...], fill: float, mult: float = 1.0) -> np.ndarray:
    new = np.full(shape, fill, np.float32 if old.dtype.kind == "f" else old.dtype)
    new[tuple(slice(0, n) for n in old.shape)] = old * mult if mult != 1.0 else old
    return new


def _scale(old: np.ndarray, shape: tuple, cfg: dict, head: bool, depthwise: bool) -> float:
    """Variance-transfer factor of a kernel's old block."""
    i0, i1 = old.shape[-2], shape[-2]
    if cfg["rescale"] is None or i1 == i0 or depthwise:
        return 1.0
    if cfg["rescale"] == "fan_in":
        return (i0 / i1) ** (cfg["head_exponent"] if head else 0.5)
    fan = np.prod(old.shape[:-1]) * (1.0 if cfg["rescale"] == "measured_old" else i1 / i0)
    return float(1.0 / math.sqrt(fan * max(float(np.var(old)), 1e-30)))


def _check_shapes(old_tree: dict, new_tree: dict, name: str) -> dict[str, tuple]:
    """Checks that ``new_tree`` only grows ``old_tree``; returns ``{path: new shape}``."""
    old_p = labels_lib.leaf_paths(old_tree)
    new_flat = jax.tree_util.tree_flatten_with_path(new_tree)[0]
    new_shapes = {labels_lib.path_str(p): tuple(x.shape) for p, x in new_flat}
    if sorted(old_p) != sorted(new_shapes):
        diff = sorted(set(old_p) ^ set(new_shapes))
        raise ValueError(
            f"next_shapes: the leaves of {name!r} differ from the variables at "
            f"{diff[:5]!r} (growth changes shapes only)"
        )
    for path, x in zip(old_p, jax.tree.leaves(old_tree)):
        a, b = tuple(np.shape(x)), new_shapes[path]
        growable = {len(a) - 1, len(a) - 2} if len(a) >= 2 else {len(a) - 1}
        bad = len(a) != len(b) or any(
            (q < p) or (q != p and ax not in growable) for ax, (p, q) in enumerate(zip(a, b))
        )
        if bad:
            raise ValueError(
                f"next_shapes: {name}/{path} goes from {a} to {b}; growth may only "
                "enlarge the last axis (and the input axis of a kernel)"
            )
    return new_shapes


def grow(
    variables: dict,
    opt_state: optax.OptState | None,
    stage: int,
    *,
    key: jax.Array | None,
    next_shapes: dict,
    optimizer: optax.GradientTransformation | None = None,
    exact: bool = True,
    rescale: str | None = "fan_in",
    head_exponent: float = 0.5,
    new_init: str | Callable[..., jax.Array] = "fan_in",
    momentum: str = "reset",
    pairing: bool = True,
    pair_noise: float = 0.0,
    num_stages: int | None = None,
    bn_epsilon: float = 1e-5,
) -> tuple[dict, optax.OptState | None]:
    """Grows Flax variables and optimizer state from stage ``stage`` to ``stage + 1``.

    Works on any model that follows the naming contract of :mod:`optax_multirate.models`
    (``MLP``, ``CNN``, ``ResNet``, with or without batch norm). For a kernel ``(..., in, out)``
    the new output slots are ``[V; V]`` and the new input slots ``[Z, -Z]``, drawn with
    ``new_init`` at the new width; the old block is multiplied by the variance-transfer scale
    ``s = sqrt(in_old / in_new)`` (``rescale``). New biases are 0, new batch-norm scales 1, new
    running means 0 and variances 1; old running means are multiplied by the scale ``p`` of the
    layer in front, variances by ``p**2``. Without batch norm, positive scales pass through
    ReLU: a hidden layer's bias is multiplied by its cumulative scale ``A``, and the head's old
    block by ``1 / A`` (``exact=True``), so logits are unchanged; ``exact=False`` (the paper's
    approximate form) rescales the head by ``(in_old / in_new) ** head_exponent`` instead, and
    logits scale by that times ``A``. In a residual stream without batch norm, the first writer
    in forward order (stem, each stage's first block's ``Conv_1``) sets the stream's scale and
    the other writers match it instead of applying their own ``s``.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of stage ``stage``.
      opt_state: the optimizer state for ``variables["params"]``, or None.
      stage: the current stage (``0 <= stage < num_stages - 1``).
      key: PRNG key of the new entries: with each kernel's index in sorted-path order it seeds
        a numpy generator (the same key gives the same growth).
      next_shapes: the variables of stage ``stage + 1`` or their shapes, e.g.
        ``jax.eval_shape(functools.partial(model.init, train=False), key, x)``.
      optimizer: the transformation that made ``opt_state`` (its ``init`` builds the new state).
      exact: keep logits exactly unchanged (True), or rescale the head as the paper does.
      rescale: ``"fan_in"`` (variance transfer), ``None`` (no rescaling), ``"measured_old"`` or
        ``"measured_new"`` (pick ``s`` so that ``Var[s W_old] = 1 / fan_in_old`` or ``_new``).
      head_exponent: exponent of the head's scale with ``exact=False`` (1.0: the muP rule).
      new_init: ``"fan_in"`` (lecun normal at the new fan-in), ``"mup_sq"`` (std
        ``1 / in_new``) or an initializer ``(key, shape, dtype) -> array``.
      momentum: ``"reset"`` (grown float state leaves become zeros) or ``"carry"`` (old block
        plus zeros). Leaves whose shape is unchanged (counts, schedules) are copied.
      pairing: pair new units (exact; even increments). ``False``: new units get zero fan-out
        instead (exact, any increment).
      pair_noise: noise (relative to the draws' std) added to the second copy of ``V``; it
        breaks exactness (0 keeps it).
      num_stages: number of stages; by default read from a :func:`growth_lr_adaptation` state.
      bn_epsilon: the batch norms' epsilon (the models' and Flax's default): running variances
        become ``p**2 * (var + eps) - eps``, so eval mode is exact; train mode (batch
        statistics) is exact up to ``eps / var``.

    Returns:
      ``(variables, opt_state)`` of stage ``stage + 1`` (opt_state None if it was None).

    Raises:
      ValueError: for a ``stage`` out of range, a missing ``key``, ``next_shapes`` that shrink,
        leave every width unchanged, change a non-growth axis or grow a stream unequally, an odd
        increment with ``pairing=True``, params outside the naming contract, an ``opt_state``
        whose structure differs from ``optimizer.init(new_params)``, a birth id
        ``>= num_stages``, or a bad option value.

    Examples:
      >>> import functools, jax, jax.numpy as jnp
      >>> from optax_multirate.models import MLP
      >>> x = jnp.ones((2, 3))
      >>> v = MLP(features=(4,), num_classes=2).init(jax.random.key(0), x)
      >>> big = MLP(features=(6,), num_classes=2)
      >>> shapes = jax.eval_shape(functools.partial(big.init, train=False), jax.random.key(0), x)
      >>> v2, _ = grow(v, None, 0, key=jax.random.key(1), next_shapes=shapes)
      >>> v2["params"]["Dense_0"]["kernel"].shape
      (3, 6)
      >>> old = MLP(features=(4,), num_classes=2).apply(v, x)
      >>> print(bool(jnp.abs(big.apply(v2, x) - old).max() < 1e-6))
      True
    """
    if not (_is_int(stage) and stage >= 0):
        raise ValueError(f"stage must be an int >= 0, got {stage!r}")
    if key is None:
        raise ValueError("key must be a PRNG key, got None")
    if rescale not in (None, "fan_in", "measured_old", "measured_new"):
        raise ValueError(
            f"rescale must be None, 'fan_in', 'measured_old' or 'measured_new', got {rescale!r}"
        )
    if not (callable(new_init) or new_init in ("fan_in", "mup_sq")):
        raise ValueError(f"new_init must be 'fan_in', 'mup_sq' or a callable, got {new_init!r}")
    if momentum not in ("reset", "carry"):
        raise ValueError(f"momentum must be 'reset' or 'carry', got {momentum!r}")
    if not head_exponent > 0:
        raise ValueError(f"head_exponent must be > 0, got {head_exponent!r}")
    if not pair_noise >= 0:
        raise ValueError(f"pair_noise must be >= 0, got {pair_noise!r}")
    if opt_state is not None and optimizer is None:
        raise ValueError("optimizer must be given to grow an opt_state")
    if num_stages is None and opt_state is not None:
        lra = [
            x
            for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GrowthLRAState))
            if isinstance(x, GrowthLRAState)
        ]
        num_stages = int(lra[0].ratios.shape[-1]) if lra else None
    if num_stages is not None and stage >= num_stages - 1:
        raise ValueError(f"stage must be < num_stages - 1 = {num_stages - 1}, got {stage}")
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError(
            "variables must be a dict of Flax collections with 'params', got "
            f"{type(variables).__name__}"
        )
    variables = flax.core.unfreeze(variables)
    next_shapes = flax.core.unfreeze(next_shapes)
    if set(variables) != set(next_shapes):
        raise ValueError(
            f"next_shapes has collections {sorted(next_shapes)}, the variables {sorted(variables)}"
        )
    shapes = {c: _check_shapes(variables[c], next_shapes[c], c) for c in variables}
    if all(
        shapes[c][p] == tuple(np.shape(x))
        for c in variables
        for p, x in zip(labels_lib.leaf_paths(variables[c]), jax.tree.leaves(variables[c]))
    ):
        raise ValueError(
            f"next_shapes grows nothing: stage {stage + 1} has the widths of stage {stage}"
        )
    cfg = dict(
        rescale=rescale,
        head_exponent=head_exponent,
        new_init=new_init,
        pairing=pairing,
        pair_noise=pair_noise,
    )
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), variables["params"])
    stats = jax.tree.map(lambda x: np.asarray(x, np.float32), variables.get("batch_stats", {}))
    index = {p: i for i, p in enumerate(labels_lib.leaf_paths(params))}
    new_params = jax.tree.map(lambda x: x, params)
    new_stats = jax.tree.map(lambda x: x, stats)

    def put(tree: dict, path: tuple[str, ...], leaf: str, value: np.ndarray) -> None:
        _get(tree, path)[leaf] = value

    widths: dict[str, tuple[int, int]] = {}
    factor: dict[str, float] = {"in": 1.0}
    for layer in _graph(params):
        pstr = "/".join(layer.path)
        mod = _get(params, layer.path)
        if "kernel" not in mod:
            raise ValueError(f"variables: layer {pstr!r} has no kernel")
        old = mod["kernel"]
        shape = shapes["params"][pstr + "/kernel"]
        i0, i1 = old.shape[-2], shape[-2]
        o0, o1 = old.shape[-1], shape[-1]
        w_src = widths.get(layer.src, (i0, i1))
        depthwise = i0 == 1 and w_src[0] != 1
        if depthwise:
            w_in = w_src
            if o0 != w_src[0] or o1 != w_src[1]:
                raise ValueError(f"next_shapes: depthwise {pstr!r} must grow with its input")
        elif (i0, i1) != w_src:
            raise ValueError(
                f"next_shapes: {pstr!r} reads {i0}->{i1} channels but its input "
                f"grows {w_src[0]}->{w_src[1]} (1 < groups < C, a flatten, or an "
                "unequal residual stream are not supported)"
            )
        else:
            w_in = (i0, i1)
        if layer.src == "in" and i1 != i0:
            raise ValueError(f"next_shapes: the input layer {pstr!r} may not grow its fan-in")
        if layer.dst == "" and o1 != o0:
            raise ValueError(f"next_shapes: the head may not grow its classes ({o0}->{o1})")
        if layer.dst:
            if widths.setdefault(layer.dst, (o0, o1)) != (o0, o1):
                raise ValueError(
                    f"next_shapes: the residual stream written by {pstr!r} grows "
                    f"{o0}->{o1}, its other writers {widths[layer.dst]}"
                )
        for k in {w_in[1] - w_in[0], o1 - o0} - {0}:
            if pairing and k % 2:
                raise ValueError(
                    f"next_shapes: {pstr!r} grows by {k} units, an odd number; "
                    "pairing=True needs even increments (pairing=False allows odd)"
                )
        a_in = factor[layer.src]
        s = _scale(old, shape, cfg, layer.dst == "", depthwise)
        target = 1.0  # output factor wanted from a batch-norm writer
        if layer.dst == "":
            mult = 1.0 / a_in if exact else s
        elif layer.dst in factor:  # a later writer of a residual stream matches its scale
            target = factor[layer.dst]
            mult = s if layer.bn else target / a_in
        else:
            mult = s
            factor[layer.dst] = 1.0 if layer.bn else s * a_in
        pre = mult * a_in  # factor of the pre-activation (before any batch norm)
        new_kernel = _grow_kernel(old, shape, mult, key, index[pstr + "/kernel"], cfg)
        put(new_params, layer.path, "kernel", new_kernel)
        if "bias" in mod:
            put(
                new_params,
                layer.path,
                "bias",
                _pad(mod["bias"], shapes["params"][pstr + "/bias"], 0.0, pre),
            )
        if layer.bn:
            bstr = "/".join(layer.bn)
            bn_p, bn_s = _get(params, layer.bn), _get(stats, layer.bn)
            for leaf, fill in (("scale", 1.0), ("bias", 0.0)):
                if leaf in bn_p:
                    put(
                        new_params,
                        layer.bn,
                        leaf,
                        _pad(bn_p[leaf], shapes["params"][f"{bstr}/{leaf}"], fill, target),
                    )
            mean = _pad(bn_s["mean"], shapes["batch_stats"][f"{bstr}/mean"], 0.0, pre)
            var = _pad(bn_s["var"], shapes["batch_stats"][f"{bstr}/var"], 1.0)
            # var + eps becomes pre**2 * (var + eps): eval mode stays exact despite eps
            n = bn_s["var"].shape[0]
            var[:n] = np.maximum(pre * pre * (var[:n] + bn_epsilon) - bn_epsilon, 0.0)
            put(new_stats, layer.bn, "mean", mean)
            put(new_stats, layer.bn, "var", var)

    def cast(new: np.ndarray, old: Any) -> jax.Array:  # jnp.asarray would compile per shape
        return jax.device_put(new.astype(np.asarray(old).dtype))

    out = dict(variables)
    out["params"] = jax.tree.map(cast, new_params, variables["params"])
    if "batch_stats" in variables:
        out["batch_stats"] = jax.tree.map(cast, new_stats, variables["batch_stats"])
    if opt_state is None:
        return out, None
    new_state = _grow_state(opt_state, out["params"], optimizer, stage, momentum, num_stages)
    return out, new_state


def _grow_state(
    opt_state: optax.OptState,
    new_params: optax.Params,
    optimizer: optax.GradientTransformation,
    stage: int,
    momentum: str,
    num_stages: int | None,
) -> optax.OptState:
    """``optimizer.init(new_params)`` with the old values carried over leaf by leaf.

    Only the structure, shapes and dtypes of the new state are needed, so ``init`` is traced
    with ``jax.eval_shape`` (nothing compiles) and every leaf is built in numpy.
    """
    fresh = jax.eval_shape(optimizer.init, new_params)
    old_leaves, old_def = jax.tree.flatten(opt_state)
    new_leaves, new_def = jax.tree.flatten(fresh)
    if old_def != new_def:
        raise ValueError(
            "opt_state does not match optimizer.init(new_params): was it made by "
            f"this optimizer?\n  opt_state: {old_def}\n  init: {new_def}"
        )
    out = []
    for leaf, n in zip(old_leaves, new_leaves):
        if tuple(np.shape(leaf)) == tuple(n.shape):
            out.append(leaf)
            continue
        o = np.asarray(leaf)
        if o.ndim != len(n.shape) or any(a > b for a, b in zip(o.shape, n.shape)):
            raise ValueError(f"opt_state: a leaf of shape {o.shape} cannot grow to {n.shape}")
        if o.dtype.kind in "iu":  # birth ids
            if num_stages is not None and stage + 1 >= num_stages:
                raise ValueError(f"num_stages={num_stages} has no stage {stage + 1}")
            new = _pad(o, n.shape, stage + 1)
        elif momentum == "carry":
            new = _pad(o, n.shape, 0.0)
        else:
            new = np.zeros(n.shape, np.float32)
        out.append(jax.device_put(new.astype(n.dtype)))
    state = jax.tree.unflatten(new_def, out)
    if optax.tree_utils.tree_get_all_with_path(state, "lra_stale"):
        state = optax.tree_utils.tree_set(state, lra_stale=jnp.asarray(True))
    return state


# ------------------------------------------------------------------------------- the loop


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(model: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


@dataclasses.dataclass
class GrownFitResult:
    """What :func:`fit_grown` returns.

    Attributes:
      params: final params (full width).
      model_state: final mutable collections (batch statistics).
      opt_state: final optimizer state.
      history: one dict per epoch: ``epoch`` (1-based), ``stage``, ``step``, ``train_time_s``
        (cumulative; growth included, compiles and evaluation excluded), ``train_loss``,
        ``train_accuracy``, ``test_loss``, ``test_accuracy``, and ``lra_ratios`` (list of
        ``r_t``) when the optimizer holds a :func:`growth_lr_adaptation` state.
      growths: one dict per growth: ``stage`` (the new stage), ``epoch``, ``step``,
        ``train_time_s``, ``grow_time_s``, ``max_logit_change`` (max absolute change of
        eval-mode logits on a probe batch) and ``max_logit``.
      final_accuracy: test accuracy after the last epoch.
      train_time_s: total train time (growth included, compiles and evaluation excluded).
      compile_time_s: time this call spent compiling step programs.
      num_compiles: step programs this call compiled, per stage.
      steps_per_stage: steps run in each stage.
      step_times_ms: per-stage lists of step wall times (compiling steps left out).
      flops_per_step: compiled FLOPs of one step per stage (``measure_flops=True``), else [].
    """

    params: Any
    model_state: Any
    opt_state: Any
    history: list[dict[str, Any]]
    growths: list[dict[str, float]]
    final_accuracy: float
    train_time_s: float
    compile_time_s: float
    num_compiles: list[int]
    steps_per_stage: list[int]
    step_times_ms: list[list[float]]
    flops_per_step: list[float]

    @property
    def flops(self) -> float:
        """Total training FLOPs: ``sum_t flops_per_step[t] * steps_per_stage[t]``."""
        return float(sum(f * n for f, n in zip(self.flops_per_step, self.steps_per_stage)))


def fit_grown(
    model_fn: Callable[[tuple[int, ...]], nn.Module],
    tx: optax.GradientTransformation,
    train: Split,
    test: Split,
    schedule: GrowthSchedule,
    *,
    batch_size: int,
    seed: int,
    grow_kwargs: dict[str, Any] | None = None,
    dispatch: str = "host",
    measure_flops: bool = False,
    probe_size: int = 256,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    step_cache: dict[Any, Any] | None = None,
) -> GrownFitResult:
    """Runs a whole grown training: each stage trains, then :func:`grow` maps to the next.

    Epoch ``e`` (counted over the whole run) visits ``batches(train, batch_size, seed=seed,
    epoch=e)``, the batches :func:`optax_multirate.train.fit` uses, so a fixed-width run
    (a one-stage schedule, ``m0=1``) sees the same data. Each stage builds its own
    :func:`~optax_multirate.train.make_train_step` (one compilation per stage); the optimizer
    state carries over through ``grow``, so schedules continue across stages.

    Args:
      model_fn: ``widths -> Flax model`` (e.g. ``lambda w: CNN(features=w, batch_norm=True)``).
      tx: the optimizer (e.g. a chain ending with :func:`growth_lr_adaptation`).
      train: training split.
      test: test split, evaluated after every epoch.
      schedule: the stages' widths and epochs.
      batch_size: examples per step.
      seed: seeds the init, the batch order, dropout and the growth draws.
      grow_kwargs: keyword arguments for :func:`grow` (``exact``, ``rescale``, ``momentum``...).
      dispatch: see :class:`~optax_multirate.phases.PhasedStep`.
      measure_flops: record the compiled FLOPs of each stage's step.
      probe_size: test examples whose logits are compared across each growth.
      on_epoch_end: ``callback(epoch, history_row)`` after each epoch's evaluation.
      step_cache: a dict kept by the caller to reuse the compiled train steps across calls
        with the same ``tx`` (e.g. the seeds of one benchmark arm), keyed by
        ``(stage model, tx, dispatch)``; ``num_compiles`` then counts this call's compiles.

    Returns:
      A :class:`GrownFitResult`.

    Raises:
      ValueError: for a ``batch_size`` out of range, or what :func:`grow` raises.

    Examples:
      >>> import numpy as np, optax
      >>> from optax_multirate.data import Split
      >>> from optax_multirate.models import MLP
      >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
      >>> split = Split(x=x, y=(x[:, 0] > 0).astype(np.int32))
      >>> sched = GrowthSchedule((8,), total_epochs=3, m0=0.5, p_c=1.0, t0=1)
      >>> res = fit_grown(lambda w: MLP(w, num_classes=2), optax.sgd(0.1), split, split,
      ...                 sched, batch_size=16, seed=0)
      >>> print(res.num_compiles, res.steps_per_stage, res.growths[0]["max_logit_change"] < 1e-5)
      [1, 1] [4, 8] True
    """
    num_batches(train, batch_size)  # validates batch_size before any work
    grow_kwargs = dict(grow_kwargs or {})
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x6E0)
    model = model_fn(schedule.widths[0])
    params, model_state = train_lib.init_model(model, jax.random.PRNGKey(seed), train.x[:1])
    opt_state = tx.init(params)
    probe = jnp.asarray(test.x[:probe_size])
    history: list[dict[str, Any]] = []
    growths: list[dict[str, float]] = []
    compiles, steps, times, flops = [], [], [], []
    train_time = compile_time = 0.0
    epoch = global_step = 0
    models = [model] + [model_fn(w) for w in schedule.widths[1:]]
    shapes = [  # the plan: each stage's variable shapes, traced once before training
        jax.eval_shape(functools.partial(m.init, train=False), jax.random.PRNGKey(0), probe[:1])
        for m in models
    ]
    for stage, stage_epochs in enumerate(schedule.epochs):
        if stage:
            before = _eval_logits(model, {"params": params, **model_state}, probe)
            t0 = time.perf_counter()
            variables, opt_state = grow(
                {"params": params, **model_state}, opt_state, stage - 1,
                key=jax.random.fold_in(key, stage), next_shapes=shapes[stage], optimizer=tx,
                num_stages=schedule.num_stages, **grow_kwargs,
            )  # fmt: skip
            params = variables.pop("params")
            model_state, model = variables, models[stage]
            jax.block_until_ready((params, opt_state))
            grow_time = time.perf_counter() - t0
            train_time += grow_time
            after = _eval_logits(model, {"params": params, **model_state}, probe)
            growths.append(
                {
                    "stage": stage,
                    "epoch": epoch,
                    "step": global_step,
                    "train_time_s": train_time,
                    "grow_time_s": grow_time,
                    "max_logit_change": float(jnp.max(jnp.abs(after - before))),
                    "max_logit": float(jnp.max(jnp.abs(before))),
                }
            )
        cache_key = (model, tx, dispatch)
        step_fn = None if step_cache is None else step_cache.get(cache_key)
        if step_fn is None:
            step_fn = train_lib.make_train_step(model, tx, dispatch=dispatch)
            if step_cache is not None:
                step_cache[cache_key] = step_fn
        n_before, t_before = step_fn.phased.num_compiles, step_fn.phased.compile_time_s
        if measure_flops:  # compiles this stage's first program (counted as the stage's)
            batch = next(iter(batches(train, batch_size, seed=seed, epoch=epoch)))
            mask = step_fn.phased.mask_for(params, opt_state)
            flops.append(
                step_fn.phased.flops(
                    mask, params, opt_state, model_state, batch, jax.random.PRNGKey(seed)
                )
            )

        def stage_row(e: int, res: train_lib.FitResult, stage=stage, step0=global_step,
                      time0=train_time) -> None:  # fmt: skip
            row: dict[str, Any] = {"stage": stage, **res.history[-1]}
            row["step"] += step0
            row["train_time_s"] += time0
            lra = optax.tree_utils.tree_get(res.opt_state, "ratios")
            if lra is not None:
                row["lra_ratios"] = [float(r) for r in np.ravel(lra)]
            history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(e, row)

        res = train_lib.fit(
            model, tx, train, test, epochs=stage_epochs, batch_size=batch_size, seed=seed,
            params=params, model_state=model_state, opt_state=opt_state, epoch_offset=epoch,
            train_step=step_fn, on_epoch_end=stage_row,
        )  # fmt: skip
        params, model_state, opt_state = res.params, res.model_state, res.opt_state
        epoch += stage_epochs
        global_step += res.steps
        train_time += res.train_time_s
        compiles.append(step_fn.phased.num_compiles - n_before)
        compile_time += step_fn.phased.compile_time_s - t_before
        steps.append(res.steps)
        times.append([t for ts in res.step_times_ms.values() for t in ts])
    return GrownFitResult(
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        history=history,
        growths=growths,
        final_accuracy=history[-1]["test_accuracy"] if history else float("nan"),
        train_time_s=train_time,
        compile_time_s=compile_time,
        num_compiles=compiles,
        steps_per_stage=steps,
        step_times_ms=times,
        flops_per_step=flops,
    )
