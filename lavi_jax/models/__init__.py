"""LaVi models: `LaVi(config.model)`, the top module."""

from lavi_jax.models.lavi import LaVi, VisualTokens, init_params

__all__ = ['LaVi', 'VisualTokens', 'init_params']
