"""jaxdiff: diffusion models in JAX/Flax as pure functions."""
