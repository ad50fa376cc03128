"""Which axes of a model's variables grow together, read from its forward pass (private).

Width growth of any Flax model rests on one fact: a new unit's pair of copies computes the
same value as long as every operation on the grown axis treats units one by one (biases,
activations, batch norms, pooling) or contracts it against a kernel's input axis, whose new
slots are ``[Z, -Z]`` and cancel. The analysis (``_rules.analyse``, with one rule per
primitive) walks the jaxpr of one eval-mode forward pass and gives every grown axis of the
variables a *stream*: axes that meet (a kernel's
output axis, the bias added to it, the next kernel's input axis, a residual sum) join one
stream, which must grow by one increment. It records, per variable, which axes a kernel
contracts (its input slots) and, per kernel, the bias and batch norm that directly follow it
(where variance transfer can rescale and the norm's statistics absorb the scale). An
operation that mixes the units of a grown axis (a reduction over it, a reshape that splits
or merges it, a contraction of two computed values over it, a slice of it) cannot keep the
function, and is refused with an error naming the layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.extend as jex
import numpy as np

U = "uniform"  # an axis along which a value is constant (a broadcast literal)

_ELEMENTWISE = frozenset(
    "add sub mul div max min pow atan2 rem select_n clamp and or xor not eq ne lt le gt ge "
    "neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan "
    "asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt integer_pow square abs erf "
    "erfc erf_inv lgamma digamma nextafter real imag conj add_any convert_element_type copy "
    "copy_p reduce_precision stop_gradient".split()
)
_VIEWS = frozenset("convert_element_type copy copy_p reduce_precision stop_gradient".split())
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax "
    "argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# operations that pass a kernel's contraction on unchanged (not a use of it)
_PASS = _VIEWS | {"reshape", "broadcast_in_dim", "transpose", "squeeze"}


class GrowthError(ValueError):
    """A layer where width growth cannot keep the model's function."""


@dataclasses.dataclass(frozen=True)
class Val:
    """The abstract value of a jaxpr variable.

    Attributes:
      axes: per axis, a stream id (a grown axis), ``U`` (constant along it) or None.
      leaf: the variable this value is a view of (transposed, cast, reshaped), or None.
      laxes: per axis, the axis of ``leaf`` it is (None for an axis the view added).
      kernel: the kernel whose contraction (plus its bias) this value is, or None.
    """

    axes: tuple
    leaf: int | None = None
    laxes: tuple | None = None
    kernel: int | None = None


@dataclasses.dataclass
class Analysis:
    """What :func:`analyse` finds.

    Attributes:
      stream: per variable, ``{axis: stream root}`` for each grown axis.
      growth: ``{stream root: (old size, new size)}``.
      contracted: per variable, the axes a kernel contraction reads (grown or not).
      produced: per variable, the grown axes that reach an output of an operation as units.
      bias: ``{kernel: bias variable}`` added right after the kernel's contraction.
      norm: ``{kernel: running-mean variable}`` of a batch norm reading that sum directly.
      uses: ``{kernel: operations that read its contraction}``.
    """

    stream: list[dict[int, int]]
    growth: dict[int, tuple[int, int]]
    contracted: list[set[int]]
    produced: list[set[int]]
    bias: dict[int, int]
    norm: dict[int, int]
    uses: dict[int, set[int]]


class Streams:
    """The streams of one analysis (a union-find over grown axes) and the walk of a jaxpr;
    the rule of each primitive is in ``_rules.Walker``."""

    def __init__(self, names: Sequence[str], params: Sequence[bool], old, new):
        self.names, self.params = list(names), list(params)
        self.parent: list[int] = []
        self.growth: dict[int, tuple[int, int]] = {}
        self.members: dict[int, list[str]] = {}
        n = len(names)
        self.stream: list[dict[int, int]] = [{} for _ in range(n)]
        for i, (a, b) in enumerate(zip(old, new)):
            for ax, (p, q) in enumerate(zip(a, b)):
                if p != q:
                    self.stream[i][ax] = self._fresh((p, q), f"{names[i]} (axis {ax})")
        self.contracted: list[set[int]] = [set() for _ in range(n)]
        self.produced: list[set[int]] = [set() for _ in range(n)]
        self.bias: dict[int, int] = {}
        self.norm: dict[int, int] = {}
        self.uses: dict[int, set[int]] = {}
        self.last_owner = ""

    # ------------------------------------------------------------------ streams

    def _fresh(self, growth: tuple[int, int], member: str) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.growth[s] = growth
        self.members[s] = [member]
        return s

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.growth[a] != self.growth[b]:
            (p, q), (r, t) = self.growth[a], self.growth[b]
            raise GrowthError(
                f"{where}: axes that meet grow unequally: {self.members[a][:3]} grow "
                f"{p}->{q}, {self.members[b][:3]} grow {r}->{t}"
            )
        self.parent[b] = a
        self.members[a] += self.members.pop(b)
        return a

    def join(self, entries: Sequence[Any], where: str) -> Any:
        """One axis of an elementwise result: the operands' streams joined."""
        streams = [e for e in entries if isinstance(e, int)]
        if not streams:
            return None if any(e is None for e in entries) else U
        if any(e is None for e in entries):
            raise GrowthError(
                f"{where}: a grown axis meets values that do not grow with it (a constant or "
                "an input computed per feature): the new units' values there are unknown"
            )
        root = streams[0]
        for s in streams[1:]:
            root = self.union(root, s, where)
        return self.find(root)

    # ------------------------------------------------------------------ walking

    def where(self, eqn: Any) -> str:
        stack = str(eqn.source_info.name_stack).split("/")
        parts = [
            p for p in stack[1:] if p and "->" not in p and not p.startswith(("jvp(", "vmap("))
        ]
        if parts:
            return f"layer {'/'.join(parts)!r}"
        if self.last_owner:
            return f"{eqn.primitive.name} after {self.last_owner!r}"
        return eqn.primitive.name

    def refuse(self, eqn: Any, why: str) -> GrowthError:
        return GrowthError(f"{self.where(eqn)}: {why}")

    def walk(self, jaxpr: Any, ins: list[Val]) -> list[Val]:
        env: dict[Any, Val] = dict(zip(jaxpr.invars, ins))

        def read(v: Any) -> Val:
            if isinstance(v, jex.core.Var):
                return env.get(v) or Val((None,) * len(v.aval.shape))
            return Val((U,) * np.ndim(v.val))

        for eqn in jaxpr.eqns:
            vals = [read(v) for v in eqn.invars]
            for v in vals:
                if v.leaf is not None:
                    self.last_owner = self.names[v.leaf].rpartition("/")[0]
                if v.kernel is not None and eqn.primitive.name not in _PASS:
                    self.uses.setdefault(v.kernel, set()).add(id(eqn))
            outs = self.step(eqn, vals)
            for o, val in zip(eqn.outvars, outs):
                env[o] = val
        return [read(v) for v in jaxpr.outvars]

    def step(self, eqn: Any, vals: list[Val]) -> list[Val]:
        name = eqn.primitive.name
        shapes = [tuple(o.aval.shape) for o in eqn.outvars]
        if not any(_active(v) for v in vals):
            plain = vals and all(all(a == U for a in v.axes) for v in vals)
            return [Val((U if plain else None,) * len(s)) for s in shapes]
        if name in _ELEMENTWISE:
            return [self.elementwise(eqn, vals, shapes[0])]
        handler = getattr(self, "p_" + name, None)
        if handler is not None:
            return handler(eqn, vals, shapes)
        sub = next((eqn.params[k] for k in _CALL_PARAMS if k in eqn.params), None)
        if sub is not None:
            return self.walk(_jaxpr(sub), vals)[: len(eqn.outvars)]
        if any(isinstance(a, int) for v in vals for a in v.axes):
            raise self.refuse(eqn, f"growth cannot follow a grown axis through {name!r}")
        return [Val((None,) * len(s)) for s in shapes]

    # ------------------------------------------------------------------ primitives

    def elementwise(self, eqn: Any, vals: list[Val], shape: tuple) -> Val:
        where = self.where(eqn)
        full = [v for v in vals if len(v.axes) == len(shape)]
        axes = tuple(self.join([v.axes[k] for v in full], where) for k in range(len(shape)))
        for v in full:
            self.mark_produced(v)
        name = eqn.primitive.name
        if name in _VIEWS and len(vals) == 1:
            return dataclasses.replace(vals[0], axes=axes)
        kern = [v for v in vals if v.kernel is not None]
        views = [v for v in vals if v.leaf is not None]
        if name in ("add", "add_any") and len(kern) == 1 and len(views) == 1:
            k, b = kern[0].kernel, views[0].leaf
            if self.params[b] and _module(self.names[b]) == _module(self.names[k]):
                self.bias.setdefault(k, b)
                return Val(axes, kernel=k)
        if name == "sub" and vals[0].kernel is not None and vals[1].leaf is not None:
            if not self.params[vals[1].leaf]:
                self.norm.setdefault(vals[0].kernel, vals[1].leaf)
        return Val(axes)

    def mark_produced(self, v: Val, axes: Sequence[int] | None = None) -> None:
        if v.leaf is None:
            return
        for k in range(len(v.axes)) if axes is None else axes:
            lax = v.laxes[k]
            if lax is not None and lax in self.stream[v.leaf]:
                self.produced[v.leaf].add(lax)

    def contract(self, eqn, left: tuple[Val, int], right: tuple[Val, int]) -> None:
        """A contraction of two axes: a kernel's input slots against a grown activation."""
        (lv, la), (rv, ra) = left, right
        for v, a in (left, right):
            if v.leaf is not None and v.laxes[a] is not None:
                self.contracted[v.leaf].add(v.laxes[a])
        ls, rs = lv.axes[la], rv.axes[ra]
        if not isinstance(ls, int) and not isinstance(rs, int):
            return
        views = [v for v in (lv, rv) if v.leaf is not None and self.params[v.leaf]]
        if isinstance(ls, int) and isinstance(rs, int) and len(views) == 1:
            self.union(ls, rs, self.where(eqn))
            return
        if isinstance(ls, int) and isinstance(rs, int):
            raise self.refuse(
                eqn,
                "it contracts two computed values over a grown axis (an attention's scores "
                "q.k over a grown head dimension, or a kernel computed from its params): the "
                "new slots add to the result; grow the number of heads instead of their size",
            )
        grown, other = (lv, rv) if isinstance(ls, int) else (rv, lv)
        if other.leaf is not None and self.params[other.leaf]:
            raise self.refuse(
                eqn, f"its kernel {self.names[other.leaf]!r} reads a grown axis with an input "
                "axis that does not grow",
            )  # fmt: skip
        if grown.leaf is not None and self.params[grown.leaf]:
            raise self.refuse(
                eqn, f"the input axis of {self.names[grown.leaf]!r} grows but its input does "
                "not (the model's inputs keep their size)",
            )  # fmt: skip
        raise self.refuse(eqn, "it sums over a grown axis: the new units would add to it")


def _active(v: Val) -> bool:
    return v.leaf is not None or v.kernel is not None or any(isinstance(a, int) for a in v.axes)


def _jaxpr(x: Any) -> Any:
    return x.jaxpr if isinstance(x, jex.core.ClosedJaxpr) else x


def _module(path: str) -> str:
    return path.rpartition("/")[0]


def _kernel_of(lhs: Val, rhs: Val, params: Sequence[bool]) -> int | None:
    views = [v.leaf for v in (lhs, rhs) if v.leaf is not None and params[v.leaf]]
    return views[0] if len(views) == 1 else None
