"""gradclip_jax: gradient clipping for JAX and Optax that says what it did to your run.

Three optax transformations share one clipping core:

- :func:`clip_by_global_norm` rescales the update to a global norm of at most ``max_norm``;
- :func:`clip_by_value` clips each coordinate;
- :func:`percentile_clip` clips at a running percentile of the recorded gradient norms.

Every one records diagnostics in its state, read with :func:`stats`, :func:`norm_percentile`
and :func:`diagnose`. :func:`global_norm` is the float32-safe, sharding-aware norm they use.
"""

from gradclip_jax._core import ClipState
from gradclip_jax._diagnostics import Finding, diagnose, find_clip_states, norm_percentile, stats
from gradclip_jax._mapping import LogMapping
from gradclip_jax._norms import global_norm
from gradclip_jax._sketch import NormSketch
from gradclip_jax._transforms import (
    MEDIAN_MULTIPLE,
    clip_by_global_norm,
    clip_by_value,
    percentile_clip,
)

__version__ = "0.1.0"

__all__ = [
    "MEDIAN_MULTIPLE",
    "ClipState",
    "Finding",
    "LogMapping",
    "NormSketch",
    "clip_by_global_norm",
    "clip_by_value",
    "diagnose",
    "find_clip_states",
    "global_norm",
    "norm_percentile",
    "percentile_clip",
    "stats",
]
