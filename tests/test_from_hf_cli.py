"""`python -m lavi_jax.convert.from_hf` on tiny Qwen2 + SigLIP (or LLaVA) folders."""

import pathlib

import jax
import numpy as np
from flax import traverse_util

from lavi_jax.convert import from_hf, hf
from lavi_jax.models.llm import layer_param_path
from tests import hf_models

TINY = str(pathlib.Path(__file__).parents[1] / 'configs' / 'tiny.py')


def assert_contains(params, imported):
  """Every imported leaf is in `params` with the same value."""
  flat = traverse_util.flatten_dict(params)
  for path, value in traverse_util.flatten_dict(imported).items():
    np.testing.assert_array_equal(flat[path], value, err_msg='/'.join(path))


def test_llm_and_vision(tmp_path):
  import transformers
  llm_dir = hf_models.save(hf_models.randomize(transformers.Qwen2ForCausalLM(
      hf_models.text_config(tie=True))), tmp_path / 'qwen2')
  vision_dir = hf_models.save(hf_models.randomize(transformers.SiglipVisionModel(
      hf_models.vision_config())), tmp_path / 'siglip')
  out = tmp_path / 'out'
  from_hf.main(['--llm', str(llm_dir), '--vision', str(vision_dir), '--config', TINY,
                '--out', str(out)])

  model, params = from_hf.load_converted(out)
  tiny = from_hf.load_config_file_model(TINY)
  assert model.llm.hidden_size == 32 and model.vision.image_size == 32  # from the HF configs
  assert model.viln.to_dict() == tiny.viln.to_dict() and model.fusion == 'viln'
  _, llm = hf.load_hf_llm(llm_dir, model)
  _, vit = hf.load_hf_vision(vision_dir, model)
  assert_contains(params, {'llm': llm, 'vit': vit})
  jax.tree.map(np.testing.assert_array_equal, params['vit'], vit)  # all of the ViT is imported
  layer = params['llm']
  for key in layer_param_path(model, 0)[0]:  # configs/tiny.py does not scan its layers
    layer = layer[key]
  for norm in ('input_layernorm', 'post_attention_layernorm'):
    conditioner = layer[norm]['conditioner']
    assert not np.asarray(conditioner['o_proj']['kernel']).any()  # zero last projection
    assert np.asarray(conditioner['q_proj']['kernel']).std() > 0
  assert 'viln_context' in params


def test_llava_into_viln(tmp_path):
  """--llava with a fusion='viln' config takes the ViT and LLM; the projector starts fresh."""
  import transformers
  vision = hf_models.vision_config().to_dict()
  vision['model_type'] = 'siglip_vision_model'
  config = transformers.LlavaConfig(
      vision_config=vision, text_config=hf_models.text_config().to_dict(),
      image_token_id=hf_models.IMAGE_TOKEN, vision_feature_select_strategy='full')
  llava_dir = hf_models.save(hf_models.randomize(
      transformers.LlavaForConditionalGeneration(config)), tmp_path / 'llava')
  out = tmp_path / 'out'
  from_hf.main(['--llava', str(llava_dir), '--config', TINY, '--out', str(out)])

  model, params = from_hf.load_converted(out)
  assert model.fusion == 'viln' and model.image_token_id == hf_models.IMAGE_TOKEN
  _, imported = hf.load_hf_llava(llava_dir, model, fusion='viln')
  assert set(imported) == {'llm', 'vit'}
  assert_contains(params, imported)
  assert params['projector']['linear_2']['kernel'].shape == (96, 96)  # tiny.py's ctx_dim
