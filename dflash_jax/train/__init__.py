"""Training DFlash drafters in JAX (DESIGN.md section 4, training paragraph): target-generated data (data), frozen
target features (features), the anchored-block objective (loss), the optax loop (trainer), GGUF export (export) and
held-out acceptance through the serving engine (evaluate). Command line: python -m dflash_jax.train."""
