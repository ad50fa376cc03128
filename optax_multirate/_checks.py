"""Argument checks shared by every factory of the library, and renamed-argument support.

One rule everywhere: a value of the wrong *type* raises :class:`TypeError`, a value of the
right type but out of range raises :class:`ValueError`; each message names the argument,
says what was expected and shows what came. Integers may be Python or numpy integers (never
``bool``); reals may be Python, numpy or 0-d array scalars. Traced values are skipped:
``optax.inject_hyperparams`` re-calls a factory inside ``update`` with traced arrays for its
numeric arguments, and those were checked when the factory was first built with Python
values. Integers that shape a state or its phases cannot be traced; their messages say to
pass them in ``static_args``.

Examples:
  >>> check_int("k", np.int32(3), low=1)
  3
  >>> check_int("k", 0, low=1)
  Traceback (most recent call last):
  ...
  ValueError: k must be an int >= 1, got 0
  >>> check_real("learning_rate", "0.1", low=0.0, low_open=True)
  Traceback (most recent call last):
  ...
  TypeError: learning_rate must be a real number, got '0.1' (str)
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = [
    "is_traced",
    "is_int",
    "check_int",
    "check_int_sequence",
    "check_real",
    "check_real_sequence",
    "check_scalar",
    "check_bool",
    "check_choice",
    "check_callable",
    "check_transformation",
    "check_instance",
    "find_state",
    "renamed_args",
]

F = TypeVar("F", bound=Callable[..., Any])


def is_traced(x: Any) -> bool:
    """True for a JAX tracer (a value seen inside ``jit``, ``grad`` or ``inject_hyperparams``)."""
    return isinstance(x, jax.core.Tracer)


def is_int(x: Any) -> bool:
    """True for a Python or numpy integer, or a concrete 0-d integer array; never a bool."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    if isinstance(x, (np.ndarray, jax.Array)) and not is_traced(x):
        return x.ndim == 0 and np.issubdtype(x.dtype, np.integer)
    return False


def _describe(x: Any) -> str:
    return f"{x!r} ({type(x).__name__})"


_STATIC_HINT = " (it shapes the state: under optax.inject_hyperparams pass it in static_args)"


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "finite"


def check_int(
    name: str,
    x: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    optional: bool = False,
    static: bool = False,
) -> int | None:
    """Checks an integer argument and returns it as a Python ``int`` (or None).

    Args:
      name: the argument's name, for the message.
      x: the value.
      low: smallest allowed value (inclusive), or None.
      high: largest allowed value (inclusive), or None.
      optional: accept None (returned as None).
      static: the integer shapes a state or its phases, so it can never be traced; the
        message then says to pass it in ``static_args`` under ``optax.inject_hyperparams``.

    Raises:
      TypeError: ``x`` is not an integer (a bool, a float, a traced ``static`` value, ...).
      ValueError: ``x`` is outside ``[low, high]``.
    """
    if optional and x is None:
        return None
    hint = _STATIC_HINT
    if is_traced(x):
        if static:
            raise TypeError(f"{name} must be a concrete int, got a traced value{hint}")
        return x
    what = "an int" + (" or None" if optional else "")
    if not is_int(x):
        raise TypeError(f"{name} must be {what}, got {_describe(x)}{hint if static else ''}")
    v = int(x)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an int {_interval(low, high, False, False)}, got {x!r}")
    return v


def check_int_sequence(
    name: str,
    xs: Any,
    *,
    low: int | None = None,
    min_len: int = 0,
    static: bool = True,
) -> tuple[int, ...]:
    """Checks a sequence of integers (widths, periods, multipliers); returns a tuple of ints.

    Args:
      name: the argument's name, for the message.
      xs: a list, a tuple or a concrete 1-D integer array (a string is refused).
      low: smallest allowed entry (inclusive), or None.
      min_len: fewest entries allowed.
      static: the sequence shapes a state or a model (the default), so it can never be
        traced; the message then says to pass it in ``static_args``.

    Raises:
      TypeError: ``xs`` is not a sequence, or an entry is not an integer (a bool, a float).
      ValueError: ``xs`` has fewer than ``min_len`` entries, or an entry is below ``low``.

    Examples:
      >>> check_int_sequence("features", [np.int64(4), 8], low=1, min_len=1)
      (4, 8)
      >>> check_int_sequence("features", (4, 0), low=1)
      Traceback (most recent call last):
      ...
      ValueError: features must hold ints >= 1, got (4, 0)
    """
    if is_traced(xs):
        raise TypeError(f"{name} must be a sequence of ints, got a traced value{_STATIC_HINT}")
    array = isinstance(xs, (np.ndarray, jax.Array)) and xs.ndim == 1
    if not array and (isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence)):
        raise TypeError(f"{name} must be a sequence of ints, got {_describe(xs)}")
    if not all(is_int(x) for x in xs):
        bad = next(x for x in xs if not is_int(x))
        raise TypeError(f"{name} must hold ints, got {xs!r} (entry {_describe(bad)})")
    if len(xs) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} int(s), got {xs!r}")
    if low is not None and any(int(x) < low for x in xs):
        raise ValueError(f"{name} must hold ints >= {low}, got {xs!r}")
    return tuple(int(x) for x in xs)


def check_real(
    name: str,
    x: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    allow_schedule: bool = False,
    allow_inf: bool = False,
    static: bool = False,
) -> Any:
    """Checks a real-valued argument (a number, or a schedule where allowed); returns it.

    Args:
      name: the argument's name, for the message.
      x: the value.
      low, high: the allowed interval's ends (None: unbounded on that side).
      low_open, high_open: whether each end is excluded.
      optional: accept None.
      allow_schedule: accept a callable (an optax schedule of the step count), unchecked.
      allow_inf: accept ``+inf`` when ``high`` is None (e.g. "no limit").
      static: the number decides something structural (a step count derived from it), so it
        can never be traced; the message then says to pass it in ``static_args``.

    Raises:
      TypeError: ``x`` is not a real number (a string, a bool, a non-scalar array, ...), a
        callable where schedules are not allowed, or a traced ``static`` value.
      ValueError: ``x`` is NaN, infinite, or outside the interval.
    """
    if optional and x is None:
        return None
    if is_traced(x):
        if static:
            raise TypeError(f"{name} must be a concrete number, got a traced value{_STATIC_HINT}")
        return x
    if callable(x) and not isinstance(x, (np.ndarray, jax.Array)):
        if allow_schedule:
            return x
        raise TypeError(f"{name} must be a real number, got a callable {_describe(x)}")
    if isinstance(x, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {_describe(x)}")
    if isinstance(x, (np.ndarray, jax.Array)):
        if x.ndim != 0 or not np.issubdtype(x.dtype, np.number):
            raise TypeError(f"{name} must be a real scalar, got an array of shape {x.shape}")
        v = float(x)
    elif isinstance(x, numbers.Real):
        v = float(x)
    else:
        kind = "a real number or a schedule" if allow_schedule else "a real number"
        raise TypeError(f"{name} must be {kind}, got {_describe(x)}")
    where = _interval(low, high, low_open, high_open)
    ok = math.isfinite(v) or (allow_inf and high is None and v == math.inf)
    ok = ok and (low is None or (v > low if low_open else v >= low))
    ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        raise ValueError(f"{name} must be a finite number {where}, got {x!r}")
    return x


def check_real_sequence(
    name: str,
    xs: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    min_len: int = 0,
) -> Any:
    """Checks a sequence (list, tuple, 1-D array) of real numbers; returns it.

    A traced array is returned unchecked (as :func:`check_real` does).

    Raises:
      TypeError: ``xs`` is not a sequence or 1-D numeric array, or an entry is not a number.
      ValueError: ``xs`` has fewer than ``min_len`` entries, or an entry is NaN, infinite or
        outside the interval.

    Examples:
      >>> check_real_sequence("scales", (1.0, 0.0), low=0.0, high=1.0, low_open=True)
      Traceback (most recent call last):
      ...
      ValueError: scales must hold finite numbers in (0.0, 1.0], got (1.0, 0.0)
    """
    if is_traced(xs):
        return xs
    if isinstance(xs, (np.ndarray, jax.Array)):
        ok = xs.ndim == 1 and np.issubdtype(xs.dtype, np.number)
    else:
        ok = isinstance(xs, Sequence) and not isinstance(xs, (str, bytes))
    if not ok:
        raise TypeError(f"{name} must be a sequence of real numbers, got {_describe(xs)}")
    if len(xs) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} number(s), got {xs!r}")
    where = _interval(low, high, low_open, high_open)
    for x in xs:
        try:
            check_real(name, x, low=low, high=high, low_open=low_open, high_open=high_open)
        except TypeError:
            raise TypeError(
                f"{name} must hold real numbers, got {xs!r} (entry {_describe(x)})"
            ) from None
        except ValueError:
            raise ValueError(f"{name} must hold finite numbers {where}, got {xs!r}") from None
    return xs


def check_bool(name: str, x: Any) -> bool:
    """Checks a Python or numpy bool; raises TypeError otherwise."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_describe(x)}")
    return bool(x)


def check_choice(name: str, x: Any, choices: tuple[Any, ...]) -> Any:
    """Checks ``x`` is one of ``choices`` (TypeError for an unhashable value, else ValueError)."""
    try:
        ok = x in choices
    except TypeError as e:
        raise TypeError(f"{name} must be one of {choices!r}, got {_describe(x)}") from e
    if not ok:
        raise ValueError(f"{name} must be one of {choices!r}, got {x!r}")
    return x


def check_callable(name: str, x: Any, *, optional: bool = False) -> Any:
    """Checks ``x`` is callable (or None when ``optional``); raises TypeError otherwise."""
    if (optional and x is None) or callable(x):
        return x
    raise TypeError(f"{name} must be callable{' or None' if optional else ''}, got {_describe(x)}")


def check_transformation(name: str, x: Any) -> Any:
    """Checks ``x`` is an ``optax.GradientTransformation``; raises TypeError otherwise."""
    import optax

    if not isinstance(x, optax.GradientTransformation):
        hint = " (call the factory: e.g. optax.sgd(0.1), not optax.sgd)" if callable(x) else ""
        raise TypeError(f"{name} must be an optax.GradientTransformation, got {_describe(x)}{hint}")
    return x


def check_instance(name: str, x: Any, cls: type, *, optional: bool = False) -> Any:
    """Checks ``x`` is a ``cls`` (or None when ``optional``); raises TypeError otherwise."""
    if (optional and x is None) or isinstance(x, cls):
        return x
    what = f"a {cls.__name__}" + (" or None" if optional else "")
    raise TypeError(f"{name} must be {what}, got {_describe(x)}")


def check_scalar(name: str, x: Any) -> Any:
    """Checks ``x`` is a numeric or bool scalar; traced values are checked too (by shape).

    For the extra arguments of ``update`` (``value=``, ``switch=``), which are usually traced:
    their shape and dtype are known at trace time.

    Raises:
      TypeError: ``x`` is not a number, a bool or an array of either, or is not 0-d.
    """
    try:
        dtype = jax.numpy.result_type(x)
    except TypeError:
        dtype = None
    if (
        x is None
        or isinstance(x, (str, bytes))
        or dtype is None
        or not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_))
    ):
        raise TypeError(f"{name} must be a numeric scalar, got {_describe(x)}")
    if np.ndim(x) != 0:
        raise TypeError(f"{name} must be a scalar, got an array of shape {np.shape(x)}")
    return x


def find_state(name: str, opt_state: Any, cls: type) -> Any:
    """The one ``cls`` state inside an optimizer state; raises a ValueError if absent or ambiguous.

    ``opt_state`` may be the ``cls`` state itself or any optax state holding it (``chain``,
    ``partition``, ``inject_hyperparams``, ...). It is found with
    ``optax.tree_utils.tree_get_all_with_path``, which finds a NamedTuple by its class name;
    only instances of ``cls`` are kept.

    Args:
      name: the argument's name, for the message.
      opt_state: the optimizer state.
      cls: a NamedTuple state class.

    Returns:
      The ``cls`` instance.

    Raises:
      ValueError: ``opt_state`` holds no ``cls`` or several (their paths are named).

    Examples:
      >>> import optax
      >>> s = optax.chain(optax.identity(), optax.scale_by_adam()).init(np.zeros(2))
      >>> find_state("opt_state", s, optax.ScaleByAdamState).count
      Array(0, dtype=int32)
      >>> find_state("opt_state", s, optax.EmaState)
      Traceback (most recent call last):
      ...
      ValueError: opt_state must hold exactly one EmaState, found none in a tuple
    """
    import optax

    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, cls.__name__, filtering=lambda _, v: isinstance(v, cls)
    )
    if len(found) == 1:
        return found[0][1]
    if not found:
        where = f"none in a {type(opt_state).__name__}"
    else:
        paths = ", ".join(jax.tree_util.keystr(p) or "(the state itself)" for p, _ in found)
        where = f"{len(found)}, at {paths}"
    raise ValueError(f"{name} must hold exactly one {cls.__name__}, found {where}")


def renamed_args(**renames: str) -> Callable[[F], F]:
    """Decorator: old keyword names keep working for one release, with a DeprecationWarning.

    ``@renamed_args(labels="param_labels")`` lets ``f(..., labels=x)`` mean
    ``f(..., param_labels=x)``. Passing both names is a TypeError.

    Examples:
      >>> @renamed_args(labels="param_labels")
      ... def f(param_labels=None):
      ...     return param_labels
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as w:
      ...     warnings.simplefilter("always")
      ...     print(f(labels=1), w[0].category.__name__)
      1 DeprecationWarning
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{fn.__name__}() got both {old!r} and its new name {new!r}; "
                            f"pass {new!r} only"
                        )
                    warnings.warn(
                        f"{fn.__name__}({old}=...) is deprecated; use {new}=... (the old "
                        "name will be removed in the next release)",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
