"""facemae_jax: masked video autoencoders for facial affect (MAE-DFER, SVFAP) in JAX/Flax."""
