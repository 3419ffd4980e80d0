"""Checking the heads' constructor parameters: scikit-learn's constraint machinery, one error type.

Each head declares ``_parameter_constraints`` as scikit-learn's own estimators do, and
:func:`check_params` runs ``BaseEstimator._validate_params`` on it plus the few checks those
constraints cannot express (a device string's form, a grid's values, a bool passed for a number).
Every failure is a :class:`ParameterError` whose one line names the parameter, what is valid
and what was given.

The constraint types come from ``sklearn.utils._param_validation``, a private module: this file
is the only place that imports it, so a change there is met here alone.
"""
from __future__ import annotations

import collections.abc
import difflib
import re
from numbers import Integral, Real
from typing import Any, Iterable, Mapping

import numpy as np
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions

from clip_heads.errors import BadValueError

__all__ = ["ParameterError", "Interval", "StrOptions", "Integral", "Real", "POSITIVE_INT", "POSITIVE",
           "NON_NEGATIVE", "FRACTION", "PROMPTS", "check_params", "check_names", "check_grid", "check_device"]


class ParameterError(InvalidParameterError, BadValueError):
    """A head parameter with an unknown name, or a value of the wrong type or range.

    A ``ValueError`` (scikit-learn's ``InvalidParameterError``, and a
    :class:`clip_heads.errors.BadValueError`: the CLI exits 2).
    """


POSITIVE_INT = Interval(Integral, 1, None, closed="left")
POSITIVE = Interval(Real, 0, None, closed="neither")
NON_NEGATIVE = Interval(Real, 0, None, closed="left")
FRACTION = Interval(Real, 0, 1, closed="neither")  # a share of the training data, 0 < f < 1
# Class prompt vectors: an array, a {class: vectors} mapping, or not given (yet).
PROMPTS = ["array-like", collections.abc.Mapping, None]
_DEVICE_RE = re.compile(r"(cpu|mps|cuda(:\d+)?)")


def _fail(owner: str, name: str, valid: str, value: Any) -> ParameterError:
    # scikit-learn's wording, so that both kinds of failure read alike.
    return ParameterError(f"The {name!r} parameter of {owner} must be {valid}. Got {value!r} instead.")


def check_device(owner: str, value: Any, name: str = "device") -> None:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (never ``"meta"``: it holds no values)."""
    text = value if isinstance(value, str) else str(value) if type(value).__name__ == "device" else None
    if text is None or not _DEVICE_RE.fullmatch(text):
        raise _fail(owner, name, "'cpu', 'cuda', 'cuda:N' or 'mps'", value)


def check_grid(owner: str, name: str, values: Any, positive: bool = True) -> list[float]:
    """A non-empty 1-D sequence of finite numbers, each > 0 (or >= 0 when not ``positive``)."""
    valid = f"a non-empty list of {'positive' if positive else 'non-negative'} numbers"
    if isinstance(values, (str, bytes, Mapping)):
        raise _fail(owner, name, valid, values)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(owner, name, valid, values) from None
    out_of_range = (arr <= 0) if positive else (arr < 0)
    if (arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all() or out_of_range.any()
            or _has_bool(values)):
        raise _fail(owner, name, valid, values)
    return arr.tolist()


def _has_bool(values: Any) -> bool:
    try:
        return any(isinstance(v, (bool, np.bool_)) for v in values)
    except TypeError:
        return False


def check_names(owner: str, names: Iterable[str], valid: Iterable[str]) -> None:
    """Refuse parameter names a head does not take, listing those it does (and a near miss)."""
    valid = sorted(valid)
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParameterError(f"{owner} has no parameter {name!r}{hint}; its parameters are {', '.join(valid)}")


def check_params(estimator: Any) -> None:
    """Validate ``estimator``'s parameters against its ``_parameter_constraints``.

    Raises :class:`ParameterError`. Beyond scikit-learn's checks: a bool is refused where a
    number is expected (``True`` is an ``int`` to Python, not an epoch count).
    """
    owner = type(estimator).__name__
    try:
        estimator._validate_params()
    except InvalidParameterError as e:
        raise ParameterError(str(e)) from None
    for name, value in estimator.get_params(deep=False).items():
        constraints = estimator._parameter_constraints.get(name, [])
        if isinstance(value, (bool, np.bool_)) and "boolean" not in constraints:
            raise _fail(owner, name, " or ".join(str(c) for c in constraints if c is not None) or "not a bool",
                        value)
