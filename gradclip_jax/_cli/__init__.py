"""The ``gradclip-jax`` command line (demo and bench); not imported by ``gradclip_jax``."""
