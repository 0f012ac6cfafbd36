"""LLaVA import: fusion='concat' gives the logits of LlavaForConditionalGeneration."""

import jax
import numpy as np
import pytest

import hf_models
from lavi_jax.convert import hf
from lavi_jax.models import LaVi

P = hf_models.IMAGE_TOKEN
TOKENS_PER_IMAGE = 16  # (32 / 8) ** 2


def llava_config(feature_layer, **kw):
  import transformers
  vision = hf_models.vision_config().to_dict()
  vision['model_type'] = 'siglip_vision_model'
  return transformers.LlavaConfig(
      vision_config=vision, text_config=hf_models.text_config().to_dict(), image_token_id=P,
      vision_feature_select_strategy='full', vision_feature_layer=feature_layer, **kw)


def expand(ids, mask):
  """One placeholder per image -> HF's TOKENS_PER_IMAGE copies, right padded.

  Returns (hf ids, hf mask, index (B, T): HF position holding our token t's logits).
  """
  rows, index = [], np.zeros(ids.shape, int)
  for b in range(ids.shape[0]):
    row = []
    for t in np.flatnonzero(mask[b]):
      row += [ids[b, t]] * (TOKENS_PER_IMAGE if ids[b, t] == P else 1)
      index[b, t] = len(row) - 1
    rows.append(row)
  length = max(map(len, rows))
  hf_ids = np.zeros((len(rows), length), np.int64)
  hf_mask = np.zeros((len(rows), length), np.int64)
  for b, row in enumerate(rows):
    hf_ids[b, :len(row)], hf_mask[b, :len(row)] = row, 1
  return hf_ids, hf_mask, index


@pytest.mark.parametrize('feature_layer', [-2, [-3, -1]])
def test_concat_logits_match_llava(tmp_path, feature_layer):
  import torch
  import transformers
  torch_model = hf_models.randomize(
      transformers.LlavaForConditionalGeneration(llava_config(feature_layer)))
  model, imported = hf.load_hf_llava(hf_models.save(torch_model, tmp_path / 'hf'),
                                     hf_models.base_model())
  assert model.fusion == 'concat' and model.image_token_id == P
  layers = (feature_layer,) if isinstance(feature_layer, int) else tuple(feature_layer)
  assert model.vision.feature_layers == layers
  assert not imported['frame_index']['embedding'].any()
  params = hf.init_with_imported(model, imported, jax.random.key(0))

  rng = np.random.default_rng(0)
  ids = rng.integers(P + 2, hf_models.VOCAB, (2, 8))
  mask = np.ones((2, 8), bool)
  ids[0, 2], ids[1, 1] = P, P  # text before and after each image
  mask[0, 6:] = False
  ids[~mask] = 0
  pixels = rng.uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
  ours = jax.jit(LaVi(model).apply)({'params': params}, ids, mask,
                                   images={'pixel_values': pixels})
  ours = np.asarray(ours)

  hf_ids, hf_mask, index = expand(ids, mask)
  with torch.no_grad():
    ref = torch_model(input_ids=torch.tensor(hf_ids), attention_mask=torch.tensor(hf_mask),
                      pixel_values=torch.tensor(pixels[:, 0].transpose(0, 3, 1, 2))).logits
  ref = np.take_along_axis(ref.numpy(), index[:, :, None], axis=1)
  np.testing.assert_allclose(ours[mask], ref[mask], rtol=0, atol=1e-4)


def test_tensor_name_layouts(tmp_path):
  """Older (`vision_tower.vision_model.*`) and in-memory transformers 5 names
  (`model.language_model.*`, `lm_head.weight`, ...) load the same parameters."""
  import transformers
  from safetensors.numpy import save_file
  torch_model = hf_models.randomize(transformers.LlavaForConditionalGeneration(llava_config(-2)))
  path = hf_models.save(torch_model, tmp_path / 'hf')
  _, reference = hf.load_hf_llava(path, hf_models.base_model())
  in_memory = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  assert 'model.language_model.embed_tokens.weight' in in_memory
  legacy = {k.replace('model.language_model.', 'language_model.model.')
            .replace('lm_head.', 'language_model.lm_head.')
            .replace('model.vision_tower.', 'vision_tower.vision_model.')
            .replace('model.multi_modal_projector.', 'multi_modal_projector.'): v
            for k, v in in_memory.items()}
  for name, tensors in (('in_memory', in_memory), ('legacy', legacy)):
    folder = tmp_path / name
    folder.mkdir()
    (folder / 'config.json').write_text((path / 'config.json').read_text())
    save_file(tensors, folder / 'model.safetensors')
    _, params = hf.load_hf_llava(folder, hf_models.base_model())
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_onevision_loads(tmp_path):
  import transformers
  vision = hf_models.vision_config().to_dict()
  vision['model_type'] = 'siglip_vision_model'
  config = transformers.LlavaOnevisionConfig(
      vision_config=vision, text_config=hf_models.text_config(tie=True).to_dict(),
      image_token_id=P, video_token_id=P + 1)
  torch_model = hf_models.randomize(
      transformers.LlavaOnevisionForConditionalGeneration(config))
  model, params = hf.load_hf_llava(hf_models.save(torch_model, tmp_path / 'hf'),
                                   hf_models.base_model())
  assert (model.fusion, model.image_token_id, model.video_token_id) == ('concat', P, P + 1)
  assert model.vision.feature_layers == (-1,) and model.llm.tie_word_embeddings
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  np.testing.assert_array_equal(params['projector']['linear_1']['kernel'],
                                state['model.multi_modal_projector.linear_1.weight'].T)
  np.testing.assert_array_equal(params['projector']['linear_2']['bias'],
                                state['model.multi_modal_projector.linear_2.bias'])
  np.testing.assert_array_equal(params['vit']['patch_embedding']['kernel'],
                                state['model.vision_tower.embeddings.patch_embedding.weight']
                                .transpose(2, 3, 1, 0))
  q = state['model.language_model.layers.1.self_attn.q_proj.weight']  # (H * Dh, D)
  np.testing.assert_array_equal(params['llm']['layers']['layer_0']['self_attn']['q_proj']
                                ['kernel'][1], q.T.reshape(32, 4, 8))
  assert 'lm_head' not in params['llm']
  hf.init_with_imported(model, params, jax.random.key(0))  # every shape fits the model
