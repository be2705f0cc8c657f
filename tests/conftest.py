"""Test session setup: CPU only, 8 simulated devices, a hypothesis profile for CI."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Must happen before JAX creates its backends; the multi-device tests need 8 CPU devices and the
# single-device tests simply run on the first one.
jax.config.update("jax_num_cpu_devices", 8)

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
