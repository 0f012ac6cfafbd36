"""LaVi models: `LaVi(config.model)`, the top module."""

from lavi_jax.models.lavi import LaVi, VisualTokens, abstract_params, init_params

__all__ = ['LaVi', 'VisualTokens', 'abstract_params', 'init_params']
