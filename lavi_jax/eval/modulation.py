"""Token-level modulation analysis: how strongly vision modulates each text token at each ViLN.

For a prompt and an image, the size of each token's deltas (dg, db) at every modulated norm,
as the RMS over the width, read from the model's 'intermediates' (ViLN sows them), and a
heatmap of them (which words the image modulates most, and where in the network).

Shapes: M modulated norms (layer by layer: attn, then mlp; then the final norm), T prompt tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from lavi_jax import config as lavi_config
from lavi_jax.data.tokenizer import Tokenizer
from lavi_jax.inference.generator import Generator
from lavi_jax.inference.requests import Request, prepare
from lavi_jax.models.lavi import LaVi
from lavi_jax.models.llm import modulation_period

SUBLAYER_OF_NORM = {norm: sub for sub, norm in lavi_config.NORM_OF_SUBLAYER.items()}


@dataclasses.dataclass
class Modulation:
  """tokens: the T prompt tokens (chat template included) as text; norms: M names like
  'layer 3 attn' or 'final'; values (M, T, 2): RMS of dg and db per norm and token."""
  tokens: list[str]
  norms: list[str]
  values: np.ndarray


@functools.partial(jax.jit, static_argnames='model')
def _intermediates(model: ml_collections.FrozenConfigDict, params, input_ids, images):
  _, state = LaVi(model).apply({'params': params}, input_ids, images=images,
                               mutable=['intermediates'])
  return state['intermediates']


def modulation_magnitudes(model: ml_collections.ConfigDict, params, tokenizer: Tokenizer,
                          prompt: str, image: Any, chat_template: str = 'chatml',
                          data: ml_collections.ConfigDict | None = None) -> Modulation:
  """Runs the prompt (one user turn, the image's placeholder first unless the prompt has one)
  with `image` (a path, bytes or array) and returns the deltas' sizes (fusion='viln')."""
  if model.fusion != 'viln':
    raise ValueError(f"modulation needs model.fusion='viln', not {model.fusion!r}")
  generator = Generator(model, params, tokenizer, chat_template, data)
  prepared = prepare(Request(prompt, images=(image,)), tokenizer, generator.template,
                     generator.spec, model, max_len=generator.spec.max_text_len + 1)
  images = jax.tree.map(lambda x: x[None], prepared.visual['images'])
  state = _intermediates(ml_collections.FrozenConfigDict(model), params,
                         prepared.input_ids[None], images)
  period = modulation_period(lavi_config.modulated_layers(model))
  rows = {}
  for path, value in traverse_util.flatten_dict(state).items():
    values = np.asarray(value[0])  # sow keeps a tuple
    if path[-2] == 'norm':
      rows[(model.llm.num_layers, 0)] = ('final', values[0])
      continue
    sub = SUBLAYER_OF_NORM[path[-2]]
    order = lavi_config.SUBLAYERS.index(sub)
    layer_name = path[path.index('llm') + 1]
    if layer_name == 'layers':  # scanned: layers/layer_j, stacked over blocks of `period`
      j = int(path[path.index('llm') + 2].split('_')[1])
      for block, v in enumerate(values):
        rows[(block * period + j, order)] = (f'layer {block * period + j} {sub}', v[0])
    else:  # layers_l
      layer = int(layer_name.split('_')[1])
      rows[(layer, order)] = (f'layer {layer} {sub}', values[0])
  names, arrays = zip(*(rows[k] for k in sorted(rows)))
  tokens = [tokenizer.decode([i]) for i in prepared.input_ids.tolist()]
  return Modulation(tokens, list(names), np.stack(arrays))


def plot_modulation_heatmap(modulation: Modulation, title: str = ''):
  """Heatmaps of |dg| and |db| (norms x tokens) -> a matplotlib Figure."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  m, t, _ = modulation.values.shape
  fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * t + 2), 2 * max(2.0, 0.25 * m + 1)),
                           squeeze=False)
  for k, (ax, name) in enumerate(zip(axes[:, 0], ('|dg|', '|db|'))):
    image = ax.imshow(modulation.values[:, :, k], aspect='auto', cmap='viridis',
                      interpolation='nearest')
    ax.set_yticks(range(m), modulation.norms, fontsize=7)
    ax.set_xticks(range(t), [repr(s)[1:-1] for s in modulation.tokens], rotation=90,
                  fontsize=7)
    ax.set_title(f'{title} {name} (RMS over the width)'.strip())
    fig.colorbar(image, ax=ax)
  fig.tight_layout()
  return fig
