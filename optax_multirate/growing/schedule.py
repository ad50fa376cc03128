"""Growth schedule: the widths and epochs of each stage of a grown training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from optax_multirate import _checks

__all__ = ["GrowthSchedule"]


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclasses.dataclass(frozen=True)
class GrowthSchedule:
    """Widths and epochs of each stage of a grown training.

    Stage ``t`` uses the width multiplier ``m_t = min(1, m0 * (1 + p_c) ** t)``; every layer's
    increment is rounded up to an even number (``even=True``, so new units come in pairs; the
    first width is chosen with the parity of the final one) and the last stage is exactly
    ``final_widths``. Consecutive stages that come out with the same widths (small widths,
    or ``multiple_of``) become one stage, their epochs added: every growth adds units.
    Stage epochs: ``T_0 = t0``, ``T_t = T_{t-1} + round(p_t * T_{t-1})``
    (halves rounded up), and the last stage gets what remains of ``total_epochs``.

    Attributes:
      final_widths: per-layer widths of the full model.
      total_epochs: epoch budget of the whole training.
      m0: width multiplier of stage 0, in (0, 1].
      p_c: width growth rate per stage (> 0).
      t0: epochs of stage 0 (int >= 1).
      p_t: epoch growth rate per stage (>= 0); ``None`` means ``p_c``.
      even: round increments up to even numbers (needed by ``grow(..., pairing=True)``).
      multiple_of: None, or round every width before the last stage up to a multiple of this
        (capped at the final width): accelerators and XLA's CPU kernels often run widths that
        are multiples of 8 or 16 at a lower cost per FLOP. With ``even=True`` it must be even
        and the final widths too, so that every increment stays even.
      widths: ``widths[t]`` is the per-layer widths of stage ``t`` (derived).
      epochs: ``epochs[t]`` is the number of epochs of stage ``t`` (derived).

    Raises:
      TypeError: for an argument of the wrong type (integers may be Python or numpy ints).
      ValueError: for ``m0`` outside (0, 1], ``p_c <= 0``, ``t0 < 1``, ``p_t < 0``, empty
        widths or widths below 1, ``multiple_of < 1`` (or odd, or an odd final width, with
        ``even=True``), or early stages whose epochs sum to ``>= total_epochs`` (the plan
        overflows the budget).

    Examples:
      >>> s = GrowthSchedule((16, 32, 64), total_epochs=16, m0=0.25, p_c=0.5, t0=1)
      >>> s.num_stages, s.epochs
      (5, (1, 2, 3, 5, 5))
      >>> [w[0] for w in s.widths]
      [4, 6, 10, 14, 16]
      >>> kw = dict(total_epochs=20, m0=0.25, p_c=0.5, t0=3, p_t=0.0)
      >>> [w[0] for w in GrowthSchedule((64,), **kw).widths]
      [16, 24, 36, 54, 64]
      >>> s = GrowthSchedule((64,), multiple_of=16, **kw)
      >>> [w[0] for w in s.widths], s.epochs
      ([16, 32, 48, 64], (3, 3, 3, 11))
    """

    final_widths: tuple[int, ...]
    total_epochs: int
    m0: float = 0.25
    p_c: float = 0.2
    t0: int = 8
    p_t: float | None = None
    even: bool = True
    multiple_of: int | None = None
    widths: tuple[tuple[int, ...], ...] = dataclasses.field(init=False)
    epochs: tuple[int, ...] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        fw = _checks.check_int_sequence("final_widths", self.final_widths, low=1, min_len=1)
        total = _checks.check_int("total_epochs", self.total_epochs, low=1)
        m0 = float(_checks.check_real("m0", self.m0, low=0.0, high=1.0, low_open=True))
        p_c = float(_checks.check_real("p_c", self.p_c, low=0.0, low_open=True))
        t0 = _checks.check_int("t0", self.t0, low=1)
        p_t = _checks.check_real("p_t", self.p_t, low=0.0, optional=True)
        p_t = p_c if p_t is None else float(p_t)
        even = _checks.check_bool("even", self.even)
        mult = _checks.check_int("multiple_of", self.multiple_of, low=1, optional=True)
        if even and mult is not None and (mult % 2 or any(c % 2 for c in fw)):
            raise ValueError(
                f"multiple_of={mult} with even=True needs an even multiple_of and even "
                f"final_widths (got {fw}), so that every increment stays even; pass even=False "
                "for growth without pairing"
            )
        steps = max(0, math.ceil(math.log(1 / m0) / math.log1p(p_c) - 1e-9))
        widths = []
        for c in fw:
            w = max(1, _half_up(c * m0))
            if even and (c - w) % 2:  # then w < c: start with the final width's parity
                w += 1
            col = [w]
            for t in range(1, steps):
                inc = max(0, math.ceil(c * min(1.0, m0 * (1 + p_c) ** t) - w - 1e-9))
                if even:
                    inc += inc % 2
                w = min(c, w + inc)
                col.append(w)
            if mult is not None:
                col = [min(c, -(-v // mult) * mult) for v in col]
            if steps:
                col.append(c)
            widths.append(col)
        epochs = [t0]
        for _ in range(1, steps):
            epochs.append(epochs[-1] + _half_up(p_t * epochs[-1]))
        epochs = epochs[:steps]
        if sum(epochs) >= total:
            raise ValueError(
                f"total_epochs={total} is too small: the {steps} early stages take "
                f"{epochs} = {sum(epochs)} epochs and the full-width stage needs at least one "
                "(lower t0 or p_t, or raise total_epochs)"
            )
        epochs.append(total - sum(epochs))
        merged: list[tuple[tuple[int, ...], int]] = []  # a growth must add units: stages
        for w, e in zip(zip(*widths), epochs):  # with the same widths become one
            if merged and merged[-1][0] == w:
                merged[-1] = (w, merged[-1][1] + e)
            else:
                merged.append((w, e))
        stages, epochs = [w for w, _ in merged], [e for _, e in merged]
        for name, value in (("final_widths", fw), ("total_epochs", total), ("m0", m0),
                            ("p_c", p_c), ("t0", t0), ("even", even),
                            ("multiple_of", mult)):  # fmt: skip
            object.__setattr__(self, name, value)
        object.__setattr__(self, "widths", tuple(stages))
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
