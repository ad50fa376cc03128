"""The phase protocol: train steps that compute only the gradients that will be read.

A transformation alone cannot save time: ``jax.grad`` has already paid for every gradient.
So a method that will ignore some gradients on its next update (slow parameters on a
fast-only multirate step, weights in a WUS window, frozen layers) says so in its state:

1. **Declare.** At ``init`` the method builds a :class:`PhaseTag` with :func:`phase_tag`:
   the paths of the param leaves it sees and, for each of its phases, which of them it reads
   (static Python, from labels). The tag is a field of the method's state; its ``phase`` is an
   int32 array leaf, the phase of the **next** ``update`` call.
2. **Decide in-graph.** ``update`` gates on the incoming tag's phase with ``jnp.where`` (never
   by multiplying, so NaN in an unread gradient changes nothing) and returns
   ``set_phase(tag, next_phase)``.
3. **Dispatch.** :class:`PhasedStep` finds every tag inside any optax state (``chain``,
   ``partition``, ``masked``, ``inject_hyperparams``, ``apply_if_finite``, ``MultiSteps``: they
   keep inner states as pytree children), reads their phases to the host, ANDs
   the tags' masks into one per-leaf "gradient needed" mask (a leaf a tag does not see is not
   constrained by it), and runs the step program compiled for that mask. The program
   differentiates the needed leaves only; the other leaves enter as ordinary traced arguments
   (never constants, so nothing recompiles when they change) and get zero gradients. Each
   distinct mask compiles once per input signature (shapes, dtypes, shardings, structure).

``dispatch="host"`` (the default) picks the program on the host: on XLA CPU a convolution
backward inside ``lax.switch`` ran about 80x slower than the same program alone.
``dispatch="switch"`` puts every reachable program in one ``lax.switch`` (one compile, no
host read); ``dispatch="full"`` always computes the full gradient (the plain optax step).
``benchmarks/step_cost.py`` measures both.

A transformation placed *before* a phased one in a chain sees zeros in the unread slots
(global-norm clipping there differs from a full-gradient run): put such clipping inside the
phased method's inner optimizer.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from optax_multirate import _checks
from optax_multirate import labels as labels_lib

__all__ = [
    "PhaseTag",
    "phase_tag",
    "set_phase",
    "zero_unread",
    "find_tags",
    "read_phases",
    "needed_mask",
    "needed_tree",
    "PhasedStep",
    "StepOutput",
    "FreezeScheduleState",
    "freeze_schedule",
]


class PhaseTag(struct.PyTreeNode):
    """The phase of one phased transformation, kept in its state.

    Attributes:
      phase: int32 scalar, the phase of the next ``update`` call.
      paths: paths of the param leaves the transformation sees (static).
      reads: ``reads[p][i]`` is True when phase ``p`` reads the gradient of ``paths[i]``
        (static).
      name: the transformation's name, for messages (static).
    """

    phase: jax.Array
    paths: tuple[str, ...] = struct.field(pytree_node=False)
    reads: tuple[tuple[bool, ...], ...] = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="")

    @property
    def num_phases(self) -> int:
        return len(self.reads)


@_checks.renamed_args(labels="param_labels")
def phase_tag(
    params: Any,
    param_labels: Any,
    reads: Mapping[int, Collection[Hashable]],
    *,
    phase: int | jax.Array = 0,
    name: str = "",
) -> PhaseTag:
    """Builds the :class:`PhaseTag` of a phased transformation at ``init``.

    Args:
      params: the params the transformation sees (``optax.MaskedNode`` holes allowed).
      param_labels: label tree (or callable) matching ``params``; see
        ``labels.check_labels``. (Its former name ``labels=`` still works for one release,
        with a ``DeprecationWarning``.)
      reads: ``{phase: labels read in that phase}`` for phases ``0..n-1``.
      phase: initial phase.
      name: the transformation's name, for messages.

    Returns:
      A tag whose ``reads`` covers every leaf of ``params``.

    Raises:
      TypeError: if ``reads`` is not a mapping or ``phase`` is not an int.
      ValueError: if the phases are not ``0..n-1``, ``phase`` is not one of them, or
        ``param_labels`` does not match ``params``.

    Examples:
      >>> p = {"body": {"kernel": 0.0}, "head": {"kernel": 0.0}}
      >>> lab = {"body": {"kernel": "slow"}, "head": {"kernel": "fast"}}
      >>> t = phase_tag(p, lab, {0: {"fast", "slow"}, 1: {"fast"}})
      >>> t.paths, t.reads
      (('body/kernel', 'head/kernel'), ((True, True), (False, True)))
    """
    _checks.check_instance("reads", reads, Mapping)
    if sorted(reads) != list(range(len(reads))) or not reads:
        raise ValueError(f"reads must have phases 0..n-1 as keys, got {sorted(reads)!r}")
    _checks.check_int("phase", phase, low=0, high=len(reads) - 1)
    by_path = labels_lib.check_labels(param_labels, params, name="param_labels")
    paths = tuple(labels_lib.leaf_paths(params))
    table = tuple(tuple(by_path[p] in set(reads[ph]) for p in paths) for ph in range(len(reads)))
    return PhaseTag(phase=jnp.asarray(phase, jnp.int32), paths=paths, reads=table, name=name)


def set_phase(tag: PhaseTag, phase: jax.typing.ArrayLike) -> PhaseTag:
    """Returns ``tag`` with a new (traced or concrete) phase.

    Raises:
      TypeError: if ``tag`` is not a :class:`PhaseTag`.
    """
    _checks.check_instance("tag", tag, PhaseTag)
    return tag.replace(phase=jnp.asarray(phase, jnp.int32))


def zero_unread(updates: Any, tag: PhaseTag) -> Any:
    """Replaces the leaves ``tag``'s current phase does not read by zeros (``jnp.where``).

    The gate every phased transformation applies to its incoming gradients: NaN or garbage
    in an unread slot changes nothing, and the traced phase selects the row in-graph.

    Args:
      updates: a tree with the structure of the params the tag was built on.
      tag: the incoming :class:`PhaseTag` (its phase gates this update).

    Raises:
      ValueError: if ``updates`` has a different number of leaves than the tag's params.
    """
    leaves, treedef = jax.tree.flatten(updates)
    if len(leaves) != len(tag.paths):
        raise ValueError(
            f"{tag.name or 'phased transformation'}: updates have {len(leaves)} leaves, the "
            f"params at init had {len(tag.paths)}"
        )
    row = jnp.asarray(tag.reads, bool)[tag.phase]
    return jax.tree.unflatten(
        treedef, [jnp.where(row[i], x, jnp.zeros_like(x)) for i, x in enumerate(leaves)]
    )


def _is_tag(x: Any) -> bool:
    return isinstance(x, PhaseTag)


def find_tags(opt_state: Any) -> list[PhaseTag]:
    """All :class:`PhaseTag` nodes in an optimizer state, in flatten order."""
    return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_tag) if _is_tag(x)]


def read_phases(opt_state: Any) -> tuple[int, ...]:
    """Current phase of each tag in ``opt_state`` (a device-to-host read per tag).

    Each scalar is read with ``np.asarray``, not ``jax.device_get``: on XLA CPU the latter,
    called right before the step, delayed the step itself (see ``wus_dispatch_overhead_ratio``
    in ``benchmarks/results/wus.json`` and the history of that file). A state has one to a
    few tags, so the reads are few.
    """
    return tuple(int(np.asarray(t.phase)) for t in find_tags(opt_state))


@functools.lru_cache(maxsize=4096)
def _mask_for(
    param_paths: tuple[str, ...],
    statics: tuple[tuple[tuple[str, ...], tuple[tuple[bool, ...], ...], str], ...],
    phases: tuple[int, ...],
) -> tuple[bool, ...]:
    index = {p: i for i, p in enumerate(param_paths)}
    mask = [True] * len(param_paths)
    for (paths, reads, name), ph in zip(statics, phases):
        if not 0 <= ph < len(reads):
            raise ValueError(f"phase tag {name!r} has phase {ph}, outside 0..{len(reads) - 1}")
        row = reads[ph]
        for p, r in zip(paths, row):
            if p not in index:
                raise ValueError(
                    f"phase tag {name!r} refers to the param {p!r}, which the train step's "
                    f"params do not have (they have {list(param_paths)[:5]!r}...): the "
                    "optimizer must be initialised with the same params the step differentiates"
                )
            if not r:
                mask[index[p]] = False
    return tuple(mask)


def _statics(tags: list[PhaseTag]) -> tuple:
    return tuple((t.paths, t.reads, t.name) for t in tags)


def needed_mask(
    opt_state: Any, params: Any, phases: tuple[int, ...] | None = None
) -> tuple[bool, ...]:
    """Per-leaf "gradient needed" mask over ``params`` for the state's current phases.

    A leaf is needed unless some tag that sees it does not read it in its current phase.

    Args:
      opt_state: optimizer state holding zero or more :class:`PhaseTag`.
      params: the params the train step differentiates.
      phases: the tags' phases; read from ``opt_state`` if None.

    Returns:
      A tuple of bools in the flatten order of ``params``.
    """
    tags = find_tags(opt_state)
    if phases is None:
        phases = tuple(int(np.asarray(t.phase)) for t in tags)  # as read_phases does
    paths = _paths_of(jax.tree.structure(params))
    return _mask_for(paths, _statics(tags), tuple(phases))


def _mask_plan(state_def: Any, params_def: Any) -> tuple[tuple[int, ...], dict]:
    """Where each tag's phase sits among the optimizer state's leaves, and an empty mask table.

    The structure of an optimizer state holds its tags' static fields, so the flat positions
    of their phase leaves are a function of that structure: found once by unflattening the
    positions themselves and reading each tag's ``phase``.
    """
    del params_def  # the table's masks are for these params; the key says so
    positions = jax.tree.unflatten(state_def, list(range(state_def.num_leaves)))
    return tuple(int(t.phase) for t in find_tags(positions)), {}


@functools.lru_cache(maxsize=256)
def _paths_of(treedef: Any) -> tuple[str, ...]:
    """The leaf paths of a params tree, from its structure (cached: on the per-step path)."""
    return tuple(labels_lib.leaf_paths(jax.tree.unflatten(treedef, [0] * treedef.num_leaves)))


def needed_tree(opt_state: Any, params: Any) -> Any:
    """:func:`needed_mask` as a tree of bools shaped like ``params``."""
    mask = needed_mask(opt_state, params)
    return jax.tree.unflatten(jax.tree.structure(params), list(mask))


_JAX_ARRAY_TYPES: set[type] = set()  # concrete jax array types seen (their aval is cached)


def _leaf_key(x: Any) -> Hashable:
    """``(shape, dtype, weak type)`` of one argument leaf: what a compiled program depends on."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        _JAX_ARRAY_TYPES.add(type(x))
        a = x.aval
        return a.shape, a.dtype, a.weak_type
    if type(x) is np.ndarray:  # a jax array of that shape and dtype has the same key
        return x.shape, x.dtype, False
    a = jax.typeof(x)
    return a.shape, a.dtype, a.weak_type


def _signature(args: Any) -> Hashable:
    """The input signature a compiled step program is kept under.

    The tree structure and each leaf's shape, dtype and weak type, so a numpy array and a jax
    array of the same shape and dtype share a signature. Shardings are left out on purpose:
    an aval also carries the abstract mesh, and two placements of the same scalar can give
    avals that differ there while the compiled program is the same; the executable checks
    shardings itself. On the per-step hot path: a flatten and a few attribute reads per leaf
    (a few microseconds for a CNN's params, optimizer state and batch).
    """
    leaves, treedef = jax.tree.flatten(args)
    keys = []
    for x in leaves:
        if type(x) in _JAX_ARRAY_TYPES:
            a = x.aval
            keys.append((a.shape, a.dtype, a.weak_type))
        else:
            keys.append(_leaf_key(x))
    return treedef, *keys


class StepOutput(NamedTuple):
    """What a train step returns."""

    params: Any
    opt_state: Any
    loss: jax.Array
    aux: Any


class PhasedStep:
    """A jitted train step that differentiates only the leaves the optimizer will read.

    ``step(params, opt_state, *args, **extra)`` computes ``loss_fn(params, *args)`` and its
    gradient (for the needed leaves), calls ``tx.update(grads, opt_state, params, **extra,
    **extra_args_fn(loss, aux))`` and applies the updates.

    Args:
      loss_fn: ``loss_fn(params, *args) -> loss`` or ``(loss, aux)`` with ``has_aux``. Batch
        norm statistics and other mutable collections go in ``aux`` (they update every step:
        the forward pass always runs).
      tx: any optax transformation (phased or not).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      extra_args_fn: ``(loss, aux) -> dict`` of extra keyword arguments for ``tx.update``
        computed in-graph from this step's forward pass (e.g. ``{"value": aux["accuracy"]}``).
      dispatch: ``"host"`` (read the phases, run that mask's program), ``"switch"`` (every
        reachable program in one ``lax.switch``), or ``"full"`` (always the full gradient).
      jit: compile the programs (False runs them eagerly, for debugging and tests).

    Attributes:
      masks: the masks run so far, in first-use order (one compiled program each under host
        dispatch).
      last_mask: the mask of the last call (None under switch dispatch).
      compile_time_s: seconds spent compiling (ahead of time, on the first call of each
        program with each input signature).
      num_compiles: number of compilations so far: one per distinct mask and input signature
        (tree structure, shapes, dtypes and shardings of the arguments); inputs that alternate
        between signatures (a short last batch) reuse the executables compiled for them.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(3), "b": jnp.zeros(())}
      >>> loss = lambda p, x: jnp.sum((p["w"] * x + p["b"]) ** 2)
      >>> step = PhasedStep(loss, optax.sgd(0.1))
      >>> out = step(params, optax.sgd(0.1).init(params), jnp.ones(3))
      >>> print(f"{float(out.loss):.1f}", step.masks)
      3.0 [(True, True)]
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        tx: optax.GradientTransformation,
        *,
        has_aux: bool = False,
        extra_args_fn: Callable[[jax.Array, Any], Mapping[str, Any]] | None = None,
        dispatch: str = "host",
        jit: bool = True,
    ):
        _checks.check_choice("dispatch", dispatch, ("host", "switch", "full"))
        _checks.check_callable("loss_fn", loss_fn)
        _checks.check_transformation("tx", tx)
        _checks.check_callable("extra_args_fn", extra_args_fn, optional=True)
        _checks.check_bool("has_aux", has_aux)
        _checks.check_bool("jit", jit)
        self.loss_fn = loss_fn
        self.tx = optax.with_extra_args_support(tx)
        self.has_aux = has_aux
        self.extra_args_fn = extra_args_fn
        self.dispatch = dispatch
        self.jit = jit
        self._programs: dict[Any, Callable[..., StepOutput]] = {}
        self._mask_plans: dict[Any, tuple[tuple[int, ...], dict[tuple[int, ...], Any]]] = {}
        self.masks: list[tuple[bool, ...]] = []
        self.last_mask: tuple[bool, ...] | None = None
        self.compile_time_s = 0.0
        self.num_compiles = 0

    # -- building blocks -------------------------------------------------------------------

    def _grad_and_update(self, mask, params, opt_state, args, extra):
        leaves, treedef = jax.tree.flatten(params)
        if len(mask) != len(leaves):
            raise ValueError(f"mask has {len(mask)} entries, params have {len(leaves)} leaves")
        live = [x for x, m in zip(leaves, mask) if m]

        def f(live_leaves):
            it = iter(live_leaves)
            full = [next(it) if m else x for x, m in zip(leaves, mask)]
            out = self.loss_fn(jax.tree.unflatten(treedef, full), *args)
            return out if self.has_aux else (out, None)

        (loss, aux), g = jax.value_and_grad(f, has_aux=True)(live)
        it = iter(g)
        grads = jax.tree.unflatten(
            treedef, [next(it) if m else jnp.zeros_like(x) for x, m in zip(leaves, mask)]
        )
        extra = dict(extra)
        if self.extra_args_fn is not None:
            extra.update(self.extra_args_fn(loss, aux))
        updates, opt_state = self.tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        return StepOutput(params, opt_state, loss, aux)

    def program(self, mask: tuple[bool, ...]) -> Callable[..., StepOutput]:
        """The (cached) step program for ``mask``: ``fn(params, opt_state, args, extra)``."""
        prog = self._programs.get(mask)
        if prog is None:
            prog = self._wrap(functools.partial(self._grad_and_update, mask))
            self._programs[mask] = prog
            self.masks.append(mask)
        return prog

    def _wrap(self, fn: Callable[..., StepOutput]) -> Callable[..., StepOutput]:
        """Compiles ahead of time once per input signature, timing compiles apart from steps.

        The executables are kept per :func:`_signature` of the arguments (tree structure and
        each leaf's shape, dtype and weak type), so inputs that alternate between shapes (a
        short last batch) reuse their executables. Shardings are checked by the executable
        itself (for free); inputs it refuses (same shapes, other shardings) get an executable of
        their own, kept under the signature plus the shardings.
        """
        if not self.jit:
            return fn
        jitted = jax.jit(fn)
        executables: dict[Hashable, Any] = {}

        def compile_for(key: Hashable, a: tuple) -> Any:
            t0 = time.perf_counter()
            exe = jitted.lower(*a).compile()
            self.compile_time_s += time.perf_counter() - t0
            self.num_compiles += 1
            executables[key] = exe
            return exe

        def executable(*a):
            key = _signature(a)
            exe = executables.get(key)
            return compile_for(key, a) if exe is None else exe

        def call(*a):
            key = _signature(a)
            exe = executables.get(key)
            if exe is None:
                exe = compile_for(key, a)
            try:
                return exe(*a)
            except (TypeError, ValueError):  # other shardings than the executable's
                key = (key, tuple(getattr(x, "sharding", None) for x in jax.tree.leaves(a)))
                exe = executables.get(key)
                return (compile_for(key, a) if exe is None else exe)(*a)

        call.lower = jitted.lower  # type: ignore[attr-defined]
        call.executable = executable  # type: ignore[attr-defined]
        return call

    def _switch_program(self, params, opt_state):
        tags = find_tags(opt_state)
        paths = tuple(labels_lib.leaf_paths(params))
        statics = _statics(tags)
        key = ("switch", paths, statics)
        prog = self._programs.get(key)
        if prog is not None:
            return prog
        combos = list(itertools.product(*[range(t.num_phases) for t in tags]))
        unique: list[tuple[bool, ...]] = []
        table = []
        for c in combos:
            m = _mask_for(paths, statics, c)
            if m not in unique:
                unique.append(m)
            table.append(unique.index(m))
        strides = [1] * len(tags)
        for i in range(len(tags) - 2, -1, -1):
            strides[i] = strides[i + 1] * tags[i + 1].num_phases
        table_arr = jnp.asarray(table, jnp.int32)
        branches = [functools.partial(self._grad_and_update, m) for m in unique]

        def run(params, opt_state, args, extra):
            if len(branches) == 1:
                return branches[0](params, opt_state, args, extra)
            idx = sum(t.phase * s for t, s in zip(find_tags(opt_state), strides))
            return jax.lax.switch(table_arr[idx], branches, params, opt_state, args, extra)

        prog = self._wrap(run)
        self._programs[key] = prog
        self.masks.extend(m for m in unique if m not in self.masks)
        return prog

    def mask_for(self, params: Any, opt_state: Any) -> tuple[bool, ...]:
        """The mask the next call would use (reads the phases under host dispatch).

        Equal to :func:`needed_mask`, with what only depends on the two trees' structures
        (where the phase leaves sit in the optimizer state, the params' paths) computed once
        per structure: on the per-step path this is one flatten and one read per tag.
        """
        params_def = jax.tree.structure(params)
        if self.dispatch == "full":
            return (True,) * params_def.num_leaves
        leaves, state_def = jax.tree.flatten(opt_state)
        plan = self._mask_plans.get((state_def, params_def))
        if plan is None:
            plan = _mask_plan(state_def, params_def)
            self._mask_plans[(state_def, params_def)] = plan
        where, table = plan
        phases = tuple(int(np.asarray(leaves[i])) for i in where)
        mask = table.get(phases)
        if mask is None:
            mask = table[phases] = needed_mask(opt_state, params, phases)
        return mask

    # -- calling ---------------------------------------------------------------------------

    def __call__(self, params: Any, opt_state: Any, *args: Any, **extra: Any) -> StepOutput:
        if self.dispatch == "switch":
            self.last_mask = None
            return self._switch_program(params, opt_state)(params, opt_state, args, extra)
        mask = self.mask_for(params, opt_state)
        self.last_mask = mask
        return self.program(mask)(params, opt_state, args, extra)

    def lower(self, mask: tuple[bool, ...] | None, params, opt_state, *args, **extra):
        """Lowers the program of ``mask`` (None: the switch program) for inspection."""
        if mask is None:
            prog = self._switch_program(params, opt_state)
        else:
            prog = jax.jit(functools.partial(self._grad_and_update, mask))
        return prog.lower(params, opt_state, args, extra)

    def flops(self, mask: tuple[bool, ...] | None, params, opt_state, *args, **extra) -> float:
        """Compiled FLOPs of one step with ``mask`` (XLA ``cost_analysis``).

        Under ``jit`` the program is compiled once for these arguments' signature and kept
        for later calls.
        """
        prog = self._switch_program(params, opt_state) if mask is None else self.program(mask)
        a = (params, opt_state, args, extra)
        if self.jit:
            exe = prog.executable(*a)
        else:
            exe = self.lower(mask, *a[:2], *args, **extra).compile()
        cost = exe.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", float("nan")))


# --------------------------------------------------------------------------- freeze schedule


class FreezeScheduleState(NamedTuple):
    """State of :func:`freeze_schedule`.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far.
      inner_state: state of the wrapped optimizer.
      tag: the :class:`PhaseTag` (phase = index of the segment the next step falls in).
    """

    count: jax.Array
    inner_state: Any
    tag: PhaseTag


@_checks.renamed_args(labels="param_labels")
def freeze_schedule(
    inner: optax.GradientTransformation,
    param_labels: Any,
    frozen: Mapping[Hashable, tuple[int, int | None]],
) -> optax.GradientTransformationExtraArgs:
    """Freezes labelled leaves for step intervals: a phased transformation.

    ``frozen = {label: (a, b)}`` freezes the leaves labelled ``label`` on steps ``a <= t < b``
    (``b=None``: for good); e.g. gradual unfreezing in the style of fastai, a backbone frozen
    for the first 100 steps: ``{"backbone": (0, 100)}``. A frozen leaf gets a zero update and
    its gradient is replaced by zero before ``inner`` sees it (``jnp.where``, so a NaN there
    changes nothing); ``inner``'s moments of frozen leaves therefore decay as under zero
    gradients. Under :class:`PhasedStep` frozen leaves are not differentiated at all.

    Args:
      inner: the optimizer to wrap.
      param_labels: label tree (or callable ``params -> tree``) matching the params. (Its
        former name ``labels=`` still works for one release, with a ``DeprecationWarning``.)
      frozen: ``{label: (start, stop)}`` with ints ``0 <= start < stop`` (stop may be None).

    Returns:
      A ``GradientTransformationExtraArgs``; extra args are passed on to ``inner``.

    Raises:
      TypeError: if ``inner`` is not an ``optax.GradientTransformation``, ``frozen`` is not a
        mapping, an interval is not a ``(start, stop)`` pair or holds a non-int (Python and
        numpy ints are accepted).
      ValueError: for an empty ``frozen``, an interval that is not ``0 <= start < stop``, and
        at ``init`` for labels that do not match the params or a frozen label that labels no
        leaf.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> p = {"body": jnp.ones(2), "head": jnp.ones(2)}
      >>> tx = freeze_schedule(optax.sgd(1.0), {"body": "b", "head": "h"}, {"b": (0, 2)})
      >>> s = tx.init(p)
      >>> for _ in range(3):
      ...     u, s = tx.update({"body": jnp.ones(2), "head": jnp.ones(2)}, s, p)
      ...     print(u["body"][0], u["head"][0], int(s.tag.phase))
      0.0 -1.0 0
      0.0 -1.0 1
      -1.0 -1.0 1
    """
    _checks.check_transformation("inner", inner)
    _checks.check_instance("frozen", frozen, Mapping)
    if not frozen:
        raise ValueError(f"frozen must name at least one label -> (start, stop), got {frozen!r}")
    frozen = {lab: _check_interval(f"frozen[{lab!r}]", iv) for lab, iv in frozen.items()}
    inner = optax.with_extra_args_support(inner)
    bounds = sorted({0} | {v for iv in frozen.values() for v in iv if v is not None})
    # segment i covers [bounds[i], bounds[i+1]); its frozen labels:
    seg_frozen = [
        frozenset(lab for lab, (a, b) in frozen.items() if a <= lo and (b is None or lo < b))
        for lo in bounds
    ]
    bounds_arr = jnp.asarray(bounds[1:], jnp.int32)

    def segment(count):
        return jnp.searchsorted(bounds_arr, count, side="right").astype(jnp.int32)

    def init_fn(params):
        by_path = labels_lib.check_labels(param_labels, params, name="param_labels")
        for lab in frozen:
            if lab not in by_path.values():
                raise ValueError(f"frozen: label {lab!r} labels no param of the params")
        all_labels = set(by_path.values())
        reads = {i: all_labels - fz for i, fz in enumerate(seg_frozen)}
        tag = phase_tag(params, param_labels, reads, phase=0, name="freeze_schedule")
        return FreezeScheduleState(jnp.zeros([], jnp.int32), inner.init(params), tag)

    def update_fn(updates, state, params=None, **extra):
        g = zero_unread(updates, state.tag)
        u, inner_state = inner.update(g, state.inner_state, params, **extra)
        u = zero_unread(u, state.tag)
        count = optax.safe_increment(state.count)
        tag = set_phase(state.tag, segment(count))
        return u, FreezeScheduleState(count, inner_state, tag)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_interval(name: str, iv: Any) -> tuple[int, int | None]:
    """A ``(start, stop)`` pair of ints, ``0 <= start < stop`` (``stop`` may be None)."""
    what = f"{name} must be (start, stop) ints with 0 <= start < stop (stop may be None)"
    if isinstance(iv, (str, bytes)) or not isinstance(iv, Sequence) or len(iv) != 2:
        raise TypeError(f"{what}, got {iv!r}")
    try:
        start = _checks.check_int("start", iv[0], low=0)
        stop = _checks.check_int("stop", iv[1], low=start + 1, optional=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}, got {iv!r}: {e}") from None
    return start, stop
