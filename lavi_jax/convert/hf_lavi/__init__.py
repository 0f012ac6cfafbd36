"""The Hugging Face remote code of a LaVi export: `convert.to_torch` copies these files next to
the weights (`auto_map` in config.json), so the folder loads with transformers alone. They
import neither JAX nor lavi_jax."""
