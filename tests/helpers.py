"""Small shared helpers for the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lavi_jax import config as lavi_config
from lavi_jax.models import init_params


# Export variants (convert.to_torch tests): model overrides as dotted keys. 8 x 8 patches per
# picture, so that video frames are pooled 2 x 2; layers scanned by default.
_EXPORT_BASE = {'vision.image_size': 64, 'vision.patch_size': 8, 'vision.video_pool': 2,
                'scan_layers': True}
EXPORT_VARIANTS = {
    'attention': {**_EXPORT_BASE, 'viln.kv_groups': 2, 'viln.sublayers': ('attn', 'mlp', 'final')},
    'mlp': {**_EXPORT_BASE, 'viln.conditioner': 'mlp', 'viln.every': 2, 'viln.gate': 'tanh'},
    'conv': {**_EXPORT_BASE, 'viln.conditioner': 'conv', 'viln.kv_groups': 2, 'scan_layers': False},
    'concat': {**_EXPORT_BASE, 'fusion': 'concat'},
    # LLaMA: no QKV biases, an untied lm_head.
    'llama': {**_EXPORT_BASE, 'llm.arch': 'llama', 'llm.qkv_bias': False,
              'llm.tie_word_embeddings': False},
}


def tiny_config(**model_overrides):
  """configs/tiny.py in float32, with model overrides given as dotted keys ('viln.every': 2)."""
  config = lavi_config.load_config_file('configs/tiny.py')
  config.model.dtype = 'float32'
  for key, value in model_overrides.items():
    node = config.model
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def random_params(model, seed=0, scale=0.05):
  """Every parameter random (norm scales around 1), without compiling `init`: quick for tests
  that need no particular initialisation."""
  abstract = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.normal(0, scale, leaf.shape)
    if str(getattr(path[-1], 'key', '')) == 'scale':
      noise = 1 + 2 * noise
    return jnp.asarray(noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_images(model, batch, frames, seed):
  side = model.vision.image_size
  return dict(pixel_values=jax.random.uniform(jax.random.key(seed), (batch, frames, side, side, 3),
                                              minval=-1, maxval=1))


def perturb(params, names=('o_proj', 'fc2'), under='conditioner', seed=0, scale=0.5):
  """Random values for the kernels named `names` inside any `under` subtree."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  rng = np.random.default_rng(seed)
  new = []
  for path, leaf in leaves:
    keys = [str(getattr(k, 'key', k)) for k in path]
    if under in keys and any(n in keys for n in names):
      leaf = jnp.asarray(rng.normal(0, scale, leaf.shape), leaf.dtype)
    new.append(leaf)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new)
