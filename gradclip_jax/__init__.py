"""gradclip_jax: gradient clipping for JAX and Optax that says what it did to your run.

Three optax transformations share one clipping core:

- :func:`clip_by_global_norm` rescales the update to a global norm of at most ``max_norm``;
- :func:`clip_by_value` clips each coordinate;
- :func:`percentile_clip` clips at a running percentile of the recorded gradient norms.

:func:`percentile_clipped` chains a percentile clip before an optimizer, its rule chosen for
that optimizer.

:func:`skip_spikes` wraps any transformation and skips the step on a spike or a NaN.

Every one records diagnostics in its state (:class:`ClipState`), read with :func:`stats`,
:func:`host_stats`, :func:`log_stats`, :func:`norm_percentile` and :func:`diagnose`.
:func:`global_norm` is the float32-safe, sharding-aware norm they use.
"""

from importlib import metadata as _metadata

from gradclip_jax._auto import percentile_clipped
from gradclip_jax._core import ClipState
from gradclip_jax._diagnostics import (
    Finding,
    diagnose,
    find_clip_states,
    host_stats,
    log_stats,
    norm_percentile,
    stats,
)
from gradclip_jax._fixed import clip_by_global_norm, clip_by_value
from gradclip_jax._flax_interop import register_flax_serialization as _register_flax
from gradclip_jax._norms import global_norm
from gradclip_jax._percentile import percentile_clip
from gradclip_jax._skip import SkipState, skip_spikes

_register_flax()  # when flax is imported already; else at the first init

try:
    __version__ = _metadata.version("gradclip-jax")
except _metadata.PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ClipState",
    "Finding",
    "SkipState",
    "clip_by_global_norm",
    "clip_by_value",
    "diagnose",
    "find_clip_states",
    "global_norm",
    "host_stats",
    "log_stats",
    "norm_percentile",
    "percentile_clip",
    "percentile_clipped",
    "skip_spikes",
    "stats",
]
