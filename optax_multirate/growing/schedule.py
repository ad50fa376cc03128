"""Growth schedule: the widths and epochs of each stage of a grown training."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["GrowthSchedule"]


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


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
