"""Runnable examples of attnhut_jax; ``examples.lm`` is the small language-model package they share."""
