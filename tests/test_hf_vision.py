"""SigLIP import: the ViT's feature-layer hidden states equal SiglipVisionModel's."""

import jax
import ml_collections
import numpy as np
import pytest

import hf_models
from lavi_jax.convert import hf
from lavi_jax.models.vit import ViT


def features(model, vit_params, pixels):
  """pixels (M, S, S, 3) -> (M, P, D * len(feature_layers))."""
  vit = ViT(ml_collections.FrozenConfigDict(model))
  return np.asarray(jax.jit(vit.apply)({'params': vit_params}, pixels))


def hf_features(vision_model, pixels, feature_layers):
  import torch
  with torch.no_grad():
    out = vision_model(torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
  return np.concatenate([out.hidden_states[f].numpy() for f in feature_layers], axis=-1)


def random_pixels(n=2, side=32, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, side, side, 3)).astype(np.float32)


@pytest.mark.parametrize('feature_layers', [(-2,), (-1, -3)])
def test_features_match_siglip(tmp_path, feature_layers):
  import transformers
  torch_model = hf_models.randomize(transformers.SiglipVisionModel(hf_models.vision_config()))
  base = hf_models.base_model()
  base.vision.feature_layers = feature_layers
  model, vit = hf.load_hf_vision(hf_models.save(torch_model, tmp_path / 'hf'), base)
  assert (model.vision.num_layers, model.vision.hidden_size, model.vision.patch_size) == (2, 32, 8)
  assert model.vision.feature_layers == feature_layers
  pixels = random_pixels()
  ours = features(model, vit, pixels)
  ref = hf_features(torch_model, pixels, feature_layers)
  assert ours.shape == ref.shape == (2, 16, 32 * len(feature_layers))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_full_siglip_model_loads_vision_tower(tmp_path):
  import transformers
  config = transformers.SiglipConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=hf_models.VOCAB),
      vision_config=hf_models.vision_config().to_dict())
  torch_model = hf_models.randomize(transformers.SiglipModel(config))
  model, vit = hf.load_hf_vision(hf_models.save(torch_model, tmp_path / 'hf'),
                                 hf_models.base_model())
  assert model.vision.num_layers == 2
  pixels = random_pixels()
  np.testing.assert_allclose(features(model, vit, pixels),
                             hf_features(torch_model.vision_model, pixels, (-2,)),
                             rtol=0, atol=1e-4)
