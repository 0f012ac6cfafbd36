"""Token-level modulation analysis: the deltas' sizes per norm and token, and their heatmap."""

import matplotlib
import numpy as np
import pytest

from lavi_jax.data import synthetic
from lavi_jax.eval.modulation import modulation_magnitudes, plot_modulation_heatmap
from tests.data_files import write_photos
from tests.helpers import perturb, random_params, tiny_config

matplotlib.use('Agg')


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
  return str(write_photos(tmp_path_factory.mktemp('photos'))['astronaut.png'])


@pytest.mark.parametrize('overrides', [
    {'scan_layers': True, 'viln.every': 2, 'viln.sublayers': ('attn', 'mlp', 'final')},
    {'scan_layers': False, 'viln.sublayers': ('mlp',)},
])
def test_deltas_per_norm_and_token(photo, overrides):
  config = tiny_config(**{'vision.image_size': 32, **overrides})
  model, tokenizer = config.model, synthetic.synthetic_tokenizer()
  params = random_params(model)
  prompt = 'what colour is the circle'
  zero = modulation_magnitudes(model, perturb(params, scale=0.0), tokenizer, prompt, photo,
                               data=config.data)
  layers = range(0, 4, 2) if model.scan_layers else range(4)
  subs = [s for s in ('attn', 'mlp') if s in model.viln.sublayers]
  expected = [f'layer {l} {s}' for l in layers for s in subs]
  assert zero.norms == expected + (['final'] if 'final' in model.viln.sublayers else [])
  t = len(zero.tokens)
  assert zero.values.shape == (len(zero.norms), t, 2)
  assert not zero.values.any()  # zero-initialised conditioners: no modulation
  mod = modulation_magnitudes(model, perturb(params), tokenizer, prompt, photo,
                              data=config.data)
  assert mod.tokens == zero.tokens and '<image>' in mod.tokens
  image_at = mod.tokens.index('<image>')
  assert not mod.values[:, :image_at].any()  # tokens before the image see nothing
  assert (mod.values[:, image_at:] > 0).all()
  assert ' circle' in mod.tokens[image_at:]
  fig = plot_modulation_heatmap(mod, title='test')
  assert len(fig.axes) == 4  # dg and db, each with a colour bar
  assert np.allclose(fig.axes[0].images[0].get_array(), mod.values[:, :, 0])
