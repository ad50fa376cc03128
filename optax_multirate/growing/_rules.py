"""How each jaxpr primitive carries the grown axes of its operands (private).

:class:`Walker` adds one rule per primitive to :class:`~optax_multirate.growing._streams.Streams`:
views (transpose, reshape, broadcast) move axes, contractions (``dot_general``, convolutions)
join a kernel's input slots to the grown axis they read, reductions, pooling windows, slices and
reshapes that mix the units of a grown axis are refused, and calls (``jit``, ``remat``, custom
derivatives, ``scan``, ``cond``) are entered. :func:`analyse` runs it over a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optax_multirate.growing._streams import (
    _CUMULATIVE,
    _REDUCE,
    Analysis,
    GrowthError,
    Streams,
    U,
    Val,
    _jaxpr,
    _kernel_of,
)


class Walker(Streams):
    """The stream analysis with a rule per primitive (``p_<name>``)."""

    def p_transpose(self, eqn, vals, shapes):
        (v,), perm = vals, eqn.params["permutation"]
        laxes = None if v.laxes is None else tuple(v.laxes[p] for p in perm)
        return [Val(tuple(v.axes[p] for p in perm), v.leaf, laxes, v.kernel)]

    def p_squeeze(self, eqn, vals, shapes):
        (v,), drop = vals, set(eqn.params["dimensions"])
        keep = [k for k in range(len(v.axes)) if k not in drop]
        laxes = None if v.laxes is None else tuple(v.laxes[k] for k in keep)
        return [Val(tuple(v.axes[k] for k in keep), v.leaf, laxes, v.kernel)]

    def p_broadcast_in_dim(self, eqn, vals, shapes):
        v, shape = vals[0], shapes[0]
        in_shape = eqn.invars[0].aval.shape
        axes, laxes = [U] * len(shape), [None] * len(shape)
        for k, d in enumerate(eqn.params["broadcast_dimensions"]):
            if in_shape[k] == shape[d]:
                axes[d] = v.axes[k]
                laxes[d] = None if v.laxes is None else v.laxes[k]
        return [Val(tuple(axes), v.leaf, tuple(laxes) if v.leaf is not None else None, v.kernel)]

    def p_reshape(self, eqn, vals, shapes):
        v, new = vals[0], shapes[0]
        old = tuple(eqn.invars[0].aval.shape)
        axes, laxes = [None] * len(new), [None] * len(new)
        for k in range(len(new)):
            if new[k] == 1:
                axes[k] = U
        for big_o, big_n in _groups(old, new):
            if len(big_o) == 1 and len(big_n) == 1:
                axes[big_n[0]] = v.axes[big_o[0]]
                laxes[big_n[0]] = None if v.laxes is None else v.laxes[big_o[0]]
                continue
            if any(isinstance(v.axes[k], int) for k in big_o):
                raise self.refuse(
                    eqn,
                    f"a reshape from {old} to {new} splits or merges a grown axis (the features "
                    "split into attention heads, or a flatten before a Dense): the new units "
                    "would not stay at the end of the axis; grow a separate heads axis, or "
                    "pool instead of flattening",
                )
            if all(v.axes[k] == U for k in big_o):
                for k in big_n:
                    axes[k] = U
        leaf_ok = v.leaf is not None and all(
            (laxes[k] is not None) or new[k] == 1 for k in range(len(new))
        )
        return [
            Val(tuple(axes), v.leaf if leaf_ok else None, tuple(laxes) if leaf_ok else None,
                v.kernel)
        ]  # fmt: skip

    def p_dot_general(self, eqn, vals, shapes):
        lhs, rhs = vals
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        where = self.where(eqn)
        for a, b in zip(lc, rc):
            self.contract(eqn, (lhs, a), (rhs, b))
        batch = [self.join([lhs.axes[a], rhs.axes[b]], where) for a, b in zip(lb, rb)]
        free_l = [k for k in range(len(lhs.axes)) if k not in lc and k not in lb]
        free_r = [k for k in range(len(rhs.axes)) if k not in rc and k not in rb]
        for v, free in ((lhs, free_l), (rhs, free_r)):
            self.mark_produced(v, free + list(lb if v is lhs else rb))
        axes = batch + [lhs.axes[k] for k in free_l] + [rhs.axes[k] for k in free_r]
        axes = [None if a == U else a for a in axes]
        kernel = _kernel_of(lhs, rhs, self.params)
        return [Val(tuple(axes), kernel=kernel)]

    def p_conv_general_dilated(self, eqn, vals, shapes):
        lhs, rhs = vals
        dn = eqn.params["dimension_numbers"]
        (lb, lf, *lsp), (ro, ri, *rsp), (ob, of, *_) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        groups = eqn.params["feature_group_count"]
        where = self.where(eqn)
        for a in rsp:
            if rhs.leaf is not None and rhs.laxes[a] is not None:
                self.contracted[rhs.leaf].add(rhs.laxes[a])
            if isinstance(rhs.axes[a], int):
                raise self.refuse(eqn, "its kernel's spatial size grows")
        if any(isinstance(lhs.axes[a], int) for a in lsp) or eqn.params["batch_group_count"] != 1:
            raise self.refuse(eqn, "a convolution over a grown axis")
        n_in = eqn.invars[0].aval.shape[lf]
        axes = [None] * len(shapes[0])
        axes[ob] = lhs.axes[lb] if lhs.axes[lb] != U else None
        if groups == 1:
            self.contract(eqn, (lhs, lf), (rhs, ri))
            axes[of] = rhs.axes[ro]
        elif groups == n_in and eqn.invars[1].aval.shape[ro] == n_in:  # depthwise
            axes[of] = self.join([lhs.axes[lf], rhs.axes[ro]], where)
            if rhs.leaf is not None and rhs.laxes[ri] is not None:
                self.contracted[rhs.leaf].add(rhs.laxes[ri])
        elif isinstance(lhs.axes[lf], int) or isinstance(rhs.axes[ro], int):
            raise self.refuse(
                eqn, f"a grouped convolution ({groups} groups) splits the grown channels"
            )
        self.mark_produced(rhs, [ro])
        return [Val(tuple(axes), kernel=_kernel_of(lhs, rhs, self.params))]

    def _reduced(self, eqn, v: Val, axes: Sequence[int], what: str) -> None:
        if any(isinstance(v.axes[a], int) for a in axes):
            raise self.refuse(
                eqn,
                f"{what} over a grown axis (a LayerNorm, an RMSNorm or a softmax over the "
                "features): the new units would change the result for the old ones",
            )

    def _reduce(self, eqn, vals, shapes):
        axes = eqn.params["axes"]
        self._reduced(eqn, vals[0], axes, "it reduces")
        kept = tuple(a for k, a in enumerate(vals[0].axes) if k not in axes)
        return [Val(kept)]

    def _cumulative(self, eqn, vals, shapes):
        self._reduced(eqn, vals[0], [eqn.params["axis"]], "a cumulative sum or maximum")
        return [Val(vals[0].axes)]

    def _along(self, eqn, vals, shapes, axis: int, what: str) -> None:
        if any(isinstance(v.axes[axis], int) for v in vals if len(v.axes) > axis):
            raise self.refuse(eqn, f"{what} along a grown axis")

    def p_concatenate(self, eqn, vals, shapes):
        d = eqn.params["dimension"]
        self._along(eqn, vals, shapes, d, "a concatenation")
        where = self.where(eqn)
        axes = [None if k == d else self.join([v.axes[k] for v in vals], where)
                for k in range(len(shapes[0]))]  # fmt: skip
        return [Val(tuple(axes))]

    def p_pad(self, eqn, vals, shapes):
        for k, cfg in enumerate(eqn.params["padding_config"]):
            if any(cfg):
                self._along(eqn, vals[:1], shapes, k, "padding")
        return [Val(tuple(None if a == U else a for a in vals[0].axes))]

    def p_slice(self, eqn, vals, shapes):
        v, old = vals[0], eqn.invars[0].aval.shape
        for k, (n, m) in enumerate(zip(old, shapes[0])):
            if n != m:
                self._along(eqn, [v], shapes, k, "a slice")
        return [Val(v.axes, v.leaf, v.laxes, v.kernel)]

    def p_gather(self, eqn, vals, shapes):
        v = vals[0]
        dn = eqn.params["dimension_numbers"]
        sizes = eqn.params["slice_sizes"]
        old = eqn.invars[0].aval.shape
        gone = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
        kept = [k for k in range(len(old)) if k not in gone]
        axes = [None] * len(shapes[0])
        for k, o in zip(kept, dn.offset_dims):
            if sizes[k] == old[k] and k not in dn.start_index_map:
                axes[o] = v.axes[k]
        for a in v.axes:
            if isinstance(a, int) and a not in axes:
                raise self.refuse(eqn, "a gather along a grown axis")
        self.mark_produced(v, [k for k in kept if k not in dn.start_index_map])
        return [Val(tuple(axes))]

    def _window(self, eqn, vals, shapes):
        v, dims = vals[0], eqn.params["window_dimensions"]
        strides = eqn.params["window_strides"]
        for k, (d, st) in enumerate(zip(dims, strides)):
            if d != 1 or st != 1:
                self._along(eqn, [v], shapes, k, "pooling")
        return [Val(tuple(None if a == U else a for a in v.axes))]

    def p_split(self, eqn, vals, shapes):
        self._along(eqn, vals, shapes, eqn.params["axis"], "a split")
        return [Val(vals[0].axes) for _ in shapes]

    def p_sort(self, eqn, vals, shapes):
        self._along(eqn, vals, shapes, eqn.params["dimension"], "a sort")
        return [Val(v.axes) for v in vals]

    def p_scan(self, eqn, vals, shapes):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        xs = []
        for v in vals[nc + nk :]:
            if isinstance(v.axes[0], int):
                raise self.refuse(
                    eqn, "the scan's length grows (more stacked layers): growth widens the "
                    "layers of a stack, it does not add layers",
                )  # fmt: skip
            laxes = None if v.laxes is None else v.laxes[1:]
            xs.append(Val(v.axes[1:], v.leaf, laxes))
        carry = vals[nc : nc + nk]
        body = _jaxpr(p["jaxpr"])
        for _ in range(2):  # carries that start uniform (zeros) take the body's streams
            outs = self.walk(body, [*vals[:nc], *carry, *xs])
            where = self.where(eqn)
            carry = [Val(tuple(self.join([a, b], where) if (a != b) else a
                               for a, b in zip(c.axes, o.axes)))
                     for c, o in zip(carry, outs[:nk])]  # fmt: skip
        ys = [Val((None, *o.axes)) for o in outs[nk:]]
        return [*carry, *ys]

    def p_cond(self, eqn, vals, shapes):
        branches = [self.walk(_jaxpr(b), vals[1:]) for b in eqn.params["branches"]]
        where = self.where(eqn)
        return [Val(tuple(self.join(list(a), where) for a in zip(*(o.axes for o in outs))))
                for outs in zip(*branches)]  # fmt: skip

    def p_pjit(self, eqn, vals, shapes):
        return self.walk(_jaxpr(eqn.params["jaxpr"]), vals)


for _name in _REDUCE:
    setattr(Walker, "p_" + _name, Walker._reduce)
for _name in ("reduce_window_max", "reduce_window_min", "reduce_window_sum", "reduce_window"):
    setattr(Walker, "p_" + _name, Walker._window)
for _name in _CUMULATIVE:
    setattr(Walker, "p_" + _name, Walker._cumulative)
Walker.p_jit = Walker.p_pjit
Walker.p_dynamic_slice = Walker.p_slice


def _groups(old: tuple, new: tuple) -> list[tuple[list[int], list[int]]]:
    """Pairs ``(old axes, new axes)`` of a reshape whose sizes multiply to the same number.

    Axes of size 1 belong to no group.
    """
    oi = [k for k, n in enumerate(old) if n != 1]
    nj = [k for k, n in enumerate(new) if n != 1]
    out, a, b = [], 0, 0
    while a < len(oi) and b < len(nj):
        go, gn = [oi[a]], [nj[b]]
        po, pn = old[oi[a]], new[nj[b]]
        a, b = a + 1, b + 1
        while po != pn and a <= len(oi) and b <= len(nj):
            if po < pn and a < len(oi):
                go.append(oi[a])
                po *= old[oi[a]]
                a += 1
            elif pn < po and b < len(nj):
                gn.append(nj[b])
                pn *= new[nj[b]]
                b += 1
            else:
                break
        out.append((go, gn))
    return out


def analyse(
    jaxpr: Any, names: Sequence[str], params: Sequence[bool], old: Sequence, new: Sequence
) -> Analysis:
    """Streams of the grown axes of ``jaxpr``'s inputs (the variables, then the inputs).

    Args:
      jaxpr: the closed jaxpr of the eval-mode forward pass; its first ``len(names)``
        inputs are the variables, the rest the model's inputs.
      names: each variable's path.
      params: per variable, True for a trainable param (False: a statistic).
      old: each variable's shape now.
      new: each variable's shape in the wider model.

    Raises:
      GrowthError: naming the layer, where growth cannot keep the function.
    """
    w = Walker(names, params, old, new)
    closed = jaxpr.jaxpr
    n = len(names)
    ins = [Val(tuple(w.stream[i].get(a) for a in range(len(old[i]))), i, tuple(range(len(old[i]))))
           for i in range(n)]  # fmt: skip
    ins += [Val((None,) * len(v.aval.shape)) for v in closed.invars[n:]]
    outs = w.walk(closed, ins)
    for o in outs:
        if any(isinstance(a, int) for a in o.axes):
            raise GrowthError(
                "the model's output grows (its last layer's outputs, e.g. the classes, must "
                "keep their number; grow the hidden widths only)"
            )
    stream = [{a: w.find(s) for a, s in st.items()} for st in w.stream]
    growth = {w.find(s): g for s, g in w.growth.items()}
    return Analysis(stream, growth, w.contracted, w.produced, w.bias, w.norm, w.uses)
