"""Small Flax (linen) models with explicit per-layer widths.

Every model is built from explicit per-layer widths (growth needs them) and has a
``width_multiplier`` shortcut (``widths(base, m)``). Layer names follow one contract that
the label helpers and :func:`optax_multirate.grow` rely on:

* ``MLP``: hidden ``Dense_0 .. Dense_{n-1}`` (and ``BatchNorm_i`` after each when
  ``batch_norm=True``), then ``head``.
* ``CNN``: ``Conv_0 .. Conv_{n-1}`` (3x3, stride 1, "SAME"; ``BatchNorm_i`` after each when
  ``batch_norm=True``), 2x2 max-pool (:func:`max_pool_2x2`) after the convolutions listed in
  ``pool_after``, global
  average pooling, optional hidden ``Dense_i``, then ``head``. The head's fan-in is the last
  conv's channel count.
* ``ResNet``: ``stem`` (+ ``stem_bn``), residual blocks ``ResBlock_0 ..`` (post-activation:
  ``Conv_0, BatchNorm_0, relu, Conv_1, BatchNorm_1``, plus a projection ``proj`` / ``proj_bn``
  where the width or stride changes), global average pooling, then ``head``.

All models take ``x`` of shape ``(batch, ...)`` and a keyword ``train`` (batch norm uses
batch statistics when ``train=True``) and return logits of shape ``(batch, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_multirate import _checks

__all__ = ["MLP", "CNN", "ResNet", "max_pool_2x2", "widths"]


def widths(base: Sequence[int], multiplier: float = 1.0, *, minimum: int = 1) -> tuple[int, ...]:
    """Scales per-layer widths by a multiplier.

    Args:
      base: per-layer widths at multiplier 1 (positive ints).
      multiplier: positive scale.
      minimum: smallest width returned (an int >= 1).

    Returns:
      ``tuple(max(minimum, round(w * multiplier)) for w in base)``.

    Raises:
      TypeError: if ``base`` is not a sequence of ints, ``multiplier`` not a number or
        ``minimum`` not an int.
      ValueError: if ``multiplier`` is not a positive finite number, a base width or
        ``minimum`` is below 1.

    Examples:
      >>> widths((16, 32, 64), 0.25)
      (4, 8, 16)
    """
    base = _checks.check_int_sequence("base", base, low=1)
    _checks.check_real("multiplier", multiplier, low=0.0, low_open=True)
    minimum = _checks.check_int("minimum", minimum, low=1)
    return tuple(max(minimum, int(round(w * float(multiplier)))) for w in base)


def _check_widths(name: str, ws: Sequence[int], allow_empty: bool = False) -> None:
    """Per-layer widths (or counts): positive ints, at least one unless ``allow_empty``."""
    _checks.check_int_sequence(name, ws, low=1, min_len=0 if allow_empty else 1)


def _windows(x: jax.Array) -> jax.Array:
    """``(b, h, w, c) -> (b, h // 2, 2, w // 2, 2, c)``: the 2x2 windows (odd edge dropped)."""
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 ("VALID"), as a reshape and a max.

    Same values, and the same derivative, as ``flax.linen.max_pool(x, (2, 2), strides=(2,
    2))`` (an odd last row or column is dropped; a window's tangent and cotangent go to its
    first maximum in row-major order, as XLA's select-and-scatter does), but cheaper to
    differentiate on XLA CPU: XLA's select-and-scatter backward took 143 ms against 15 ms for
    a reshape-max on a ``(128, 28, 28, 32)`` input, and this rule (an elementwise
    first-maximum mask, where ``jnp.max``'s derivative splits ties with an extra reduction
    and a division) took the CNN's bias-only step from 0.749 to 0.461 of a full step in
    ``python -m benchmarks.step_cost``. Forward and reverse mode both work.

    Args:
      x: ``(batch, height, width, channels)``.

    Returns:
      ``(batch, height // 2, width // 2, channels)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> max_pool_2x2(jnp.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
      >>> jax.grad(lambda x: max_pool_2x2(x).sum())(jnp.ones((1, 2, 2, 1)))[0, :, :, 0]
      Array([[1., 0.],
             [0., 0.]], dtype=float32)
    """
    return _windows(x).max(axis=(2, 4))


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    xw = _windows(x)
    y = xw.max(axis=(2, 4))
    is_max = lambda i, j: xw[:, :, i, :, j] == y
    m00 = is_max(0, 0)
    m01 = is_max(0, 1) & ~m00
    seen = m00 | m01
    m10 = is_max(1, 0) & ~seen
    m11 = ~(seen | m10)
    first = jnp.stack([jnp.stack([m00, m01], axis=3), jnp.stack([m10, m11], axis=3)], axis=2)
    tw = _windows(t)
    return y, jnp.where(first, tw, jnp.zeros_like(tw)).sum(axis=(2, 4))


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    Attributes:
      features: hidden widths, one per hidden ``Dense`` layer.
      num_classes: width of the ``head``.
      batch_norm: add ``BatchNorm`` after each hidden layer (its ``Dense`` then has no bias).
      use_bias: give the hidden ``Dense`` layers a bias (ignored with ``batch_norm``).
      dropout: dropout rate after each hidden activation (needs a ``dropout`` rng when training).
    """

    features: Sequence[int] = (256, 256)
    num_classes: int = 10
    batch_norm: bool = False
    use_bias: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        _check_widths("features", self.features, allow_empty=True)
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.features):
            x = nn.Dense(w, use_bias=self.use_bias and not self.batch_norm, name=f"Dense_{i}")(x)
            if self.batch_norm:
                x = _bn(train, f"BatchNorm_{i}")(x)
            x = nn.relu(x)
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)


class CNN(nn.Module):
    """Small convolutional network ending in global average pooling.

    Attributes:
      features: output channels of each 3x3 convolution.
      dense: widths of hidden ``Dense`` layers after the pooling (may be empty).
      num_classes: width of the ``head``.
      pool_after: indices of convolutions followed by a 2x2 max-pool.
      batch_norm: add ``BatchNorm`` after each convolution (the conv then has no bias).
      use_bias: give convolutions a bias (ignored with ``batch_norm``).
    """

    features: Sequence[int] = (32, 64)
    dense: Sequence[int] = ()
    num_classes: int = 10
    pool_after: Sequence[int] = (0, 1)
    batch_norm: bool = False
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        _check_widths("features", self.features)
        _check_widths("dense", self.dense, allow_empty=True)
        if x.ndim == 3:
            x = x[..., None]
        for i, c in enumerate(self.features):
            x = nn.Conv(
                c,
                (3, 3),
                padding="SAME",
                use_bias=self.use_bias and not self.batch_norm,
                name=f"Conv_{i}",
            )(x)
            if self.batch_norm:
                x = _bn(train, f"BatchNorm_{i}")(x)
            x = nn.relu(x)
            if i in self.pool_after:
                x = max_pool_2x2(x)
        x = jnp.mean(x, axis=(1, 2))
        for i, w in enumerate(self.dense):
            x = nn.relu(nn.Dense(w, name=f"Dense_{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class ResBlock(nn.Module):
    """Post-activation residual block: conv-BN-relu-conv-BN, plus shortcut, then relu."""

    features: int
    strides: int = 1
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        bias = not self.batch_norm
        y = nn.Conv(
            self.features, (3, 3), self.strides, padding="SAME", use_bias=bias, name="Conv_0"
        )(x)
        if self.batch_norm:
            y = _bn(train, "BatchNorm_0")(y)
        y = nn.relu(y)
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=bias, name="Conv_1")(y)
        if self.batch_norm:
            y = _bn(train, "BatchNorm_1")(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), self.strides, use_bias=bias, name="proj")(x)
            if self.batch_norm:
                x = _bn(train, "proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Small ResNet: stem, stages of residual blocks, global average pooling, head.

    Attributes:
      stage_features: channels of each stage (the stem has ``stage_features[0]``).
      blocks_per_stage: residual blocks in each stage.
      num_classes: width of the ``head``.
      batch_norm: use batch norm (convolutions then have no bias).
    """

    stage_features: Sequence[int] = (16, 32, 64)
    blocks_per_stage: Sequence[int] = (1, 1, 1)
    num_classes: int = 10
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        _check_widths("stage_features", self.stage_features)
        _check_widths("blocks_per_stage", self.blocks_per_stage)
        if len(self.blocks_per_stage) != len(self.stage_features):
            raise ValueError(
                "blocks_per_stage must have one entry per stage, got "
                f"{tuple(self.blocks_per_stage)!r} for stage_features "
                f"{tuple(self.stage_features)!r}"
            )
        if x.ndim == 3:
            x = x[..., None]
        x = nn.Conv(
            self.stage_features[0],
            (3, 3),
            padding="SAME",
            use_bias=not self.batch_norm,
            name="stem",
        )(x)
        if self.batch_norm:
            x = _bn(train, "stem_bn")(x)
        x = nn.relu(x)
        b = 0
        for s, (c, n) in enumerate(zip(self.stage_features, self.blocks_per_stage)):
            for j in range(n):
                strides = 2 if (s > 0 and j == 0) else 1
                x = ResBlock(c, strides, self.batch_norm, name=f"ResBlock_{b}")(x, train=train)
                b += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)
