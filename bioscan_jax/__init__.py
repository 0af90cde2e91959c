"""bioscan-jax: BIOSCAN-5M tooling and benchmarks in JAX/Flax NNX."""

__version__ = "0.1.0"
