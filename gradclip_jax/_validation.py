"""Construction-time argument checks shared by every public factory.

Values that arrive traced (``optax.inject_hyperparams`` passes hyperparameters as arrays that
are traced inside ``update``) cannot be inspected in Python; they are skipped here and used
as given.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NONFINITE_MODES = ("zero", "propagate")


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _as_float(name: str, value: Any) -> float | None:
    """The Python float behind ``value``, or None when it is traced."""
    if is_traced(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    array = np.asarray(value)
    if array.shape != ():
        raise TypeError(
            f"{name} must be a real scalar (a float or a 0-d array), got an array of shape "
            f"{array.shape}"
        )
    if not jnp.issubdtype(array.dtype, jnp.number) or jnp.issubdtype(
            array.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be a real scalar, got {value!r}")
    return float(array)


def check_range(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = True,
    high_open: bool = True,
) -> None:
    """Raises ValueError unless ``low < value < high`` (or <= for closed ends)."""
    x = _as_float(name, value)
    if x is None:
        return
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    if not (above and below) or math.isnan(x):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """A finite number > 0 (a threshold)."""
    check_range(name, value, low=0.0)


def check_int(name: str, value: Any, *, low: int) -> None:
    x = _as_float(name, value)
    if x is None:
        return
    if not float(x).is_integer():
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if x < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_ord(ord: Any) -> Any:
    """Validates ``ord`` and returns it as a Python number (a traced value is returned as is)."""
    x = _as_float("ord", ord)
    if x is None:
        return ord
    if x not in (1.0, 2.0, math.inf):
        raise ValueError(f"ord must be 1, 2 or math.inf, got {ord!r}")
    return math.inf if x == math.inf else int(x)


def check_norm_range(norm_range: Any) -> tuple[float, float]:
    """``(low, high)``, two concrete numbers with ``0 < low < high < inf``, as floats."""
    if not isinstance(norm_range, (tuple, list)) or len(norm_range) != 2:
        raise TypeError(f"norm_range must be a pair (low, high), got {norm_range!r}")
    if any(is_traced(x) for x in norm_range):
        raise TypeError("norm_range fixes the histogram's shape, so it must be concrete "
                        f"numbers, not traced values; got {norm_range!r}")
    low, high = (_as_float("norm_range", x) for x in norm_range)
    assert low is not None and high is not None
    if not 0.0 < low < high < math.inf:
        raise ValueError(f"norm_range must be (low, high) with 0 < low < high < inf, "
                         f"got {norm_range!r}")
    return low, high


def check_nonfinite(nonfinite: Any) -> None:
    if not isinstance(nonfinite, str):
        raise TypeError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")


def check_axis_name(axis_name: Any) -> None:
    if axis_name is None or isinstance(axis_name, str):
        return
    if isinstance(axis_name, (tuple, list)) and all(isinstance(a, str) for a in axis_name):
        return
    raise TypeError(f"axis_name must be None, a str or a tuple of str, got {axis_name!r}")


def check_threshold(name: str, value: Any) -> None:
    """A threshold: a positive number, a scalar array, or a schedule (callable of the step)."""
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
        return
    check_positive(name, value)


def warn_if_quantile(name: str, value: Any, *, stacklevel: int) -> None:
    """Warns when a percentile in (0, 1] looks like a 0-1 quantile (0.9 for the 90th)."""
    x = _as_float(name, value)
    if x is not None and 0.0 < x <= 1.0:
        warnings.warn(
            f"{name}={value!r} is read as a percentile in (0, 100], so this is the "
            f"{x:g}th percentile, not the {100 * x:g}th; pass {name}={100 * x:g} for that",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_name(name: Any) -> None:
    """A transform's name: None, or a non-empty str without "/" (it prefixes stats keys)."""
    if name is None:
        return
    if not isinstance(name, str):
        raise TypeError(f"name must be None or a str, got {type(name).__name__} {name!r}")
    if not name or "/" in name:
        raise ValueError(f"name must be a non-empty str without '/', got {name!r}")
