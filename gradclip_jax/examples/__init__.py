"""Worked examples built on gradclip_jax (need only jax and optax; not imported by default)."""
