"""LaVi's central invariants: zero-initialised conditioners give exactly the base LLM; once
perturbed, vision changes the logits, and only for text at or after an item's placeholder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax.models import LaVi, init_params
from lavi_jax.models.lavi import concat_layout, VisualTokens, pool_grid
from tests.helpers import perturb, random_images, tiny_config

CONDITIONER_SETTINGS = [
    {'viln.conditioner': 'attention'},
    {'viln.conditioner': 'attention', 'viln.kv_groups': 2, 'viln.sublayers': ('attn', 'final')},
    {'viln.conditioner': 'mlp', 'viln.every': 2},
    {'viln.conditioner': 'conv', 'viln.kv_groups': 4, 'viln.delta_clip': 0.5},
    {'viln.conditioner': 'attention', 'viln.layers': (1, 2), 'scan_layers': False},
]


def _setup(overrides):
  model = tiny_config(**overrides).model
  params = nn.unbox(init_params(model, jax.random.key(0)))
  apply = jax.jit(lambda p, **kw: LaVi(model).apply({'params': p}, **kw))
  ids = jax.random.randint(jax.random.key(1), (2, 12), 3, model.llm.vocab_size)
  ids = ids.at[:, 5].set(model.image_token_id)
  return model, params, apply, ids


@pytest.mark.parametrize('overrides', CONDITIONER_SETTINGS)
def test_zero_initialised_conditioners_give_the_base_llm(overrides):
  model, params, apply, ids = _setup(overrides)
  text_only = apply(params, input_ids=ids)
  for seed in (2, 3):
    with_image = apply(params, input_ids=ids, images=random_images(model, 2, 2, seed))
    np.testing.assert_array_equal(np.asarray(with_image), np.asarray(text_only))


@pytest.mark.parametrize('overrides', CONDITIONER_SETTINGS)
def test_perturbed_conditioners_see_the_image_after_its_placeholder(overrides):
  model, params, apply, ids = _setup(overrides)
  params = perturb(params)
  text_only = np.asarray(apply(params, input_ids=ids))
  a = np.asarray(apply(params, input_ids=ids, images=random_images(model, 2, 2, 2)))
  b = np.asarray(apply(params, input_ids=ids, images=random_images(model, 2, 2, 3)))
  # Before the placeholder at position 5: exactly the text-only logits.
  np.testing.assert_array_equal(a[:, :5], text_only[:, :5])
  np.testing.assert_array_equal(b[:, :5], text_only[:, :5])
  # From the placeholder on: the image matters, and two images differ.
  assert np.abs(a[:, 5:] - text_only[:, 5:]).max() > 1e-3
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


def test_tanh_gate_starts_closed_but_trains():
  model, params, apply, ids = _setup({'viln.gate': 'tanh'})
  images = random_images(model, 2, 1, 2)
  np.testing.assert_array_equal(np.asarray(apply(params, input_ids=ids, images=images)),
                                np.asarray(apply(params, input_ids=ids)))

  def loss(p):
    return apply(p, input_ids=ids, images=images).sum()

  grads = jax.grad(loss)(params)
  gate_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
                if 'gate' in str(path[-1])]
  assert gate_grads and max(float(jnp.abs(g).max()) for g in gate_grads) > 0


def test_each_item_is_seen_only_from_its_placeholder_on():
  model, params, apply, ids = _setup({'viln.conditioner': 'attention'})
  params = perturb(params)
  ids = ids.at[:, 3].set(model.image_token_id).at[:, 5].set(3).at[:, 8].set(
      model.video_token_id)
  frames = random_images(model, 2, 3, 4)['pixel_values']
  # Image item 0 has 2 crops; video item 1 has 3 frames.
  images = dict(pixel_values=frames[:, :2], frame_item=jnp.zeros((2, 2), jnp.int32))
  videos = dict(pixel_values=frames, frame_item=jnp.ones((2, 3), jnp.int32))
  other_video = dict(videos, pixel_values=random_images(model, 2, 3, 5)['pixel_values'])
  base = np.asarray(apply(params, input_ids=ids, images=images, videos=videos))
  changed = np.asarray(apply(params, input_ids=ids, images=images, videos=other_video))
  np.testing.assert_array_equal(base[:, :8], changed[:, :8])
  assert np.abs(base[:, 8:] - changed[:, 8:]).max() > 1e-3
  # A padded (masked-out) frame changes nothing.
  padded = dict(pixel_values=jnp.concatenate([frames, frames[:, :1] * 0.3], 1),
                frame_item=jnp.ones((2, 4), jnp.int32),
                frame_mask=jnp.array([[True] * 3 + [False]] * 2))
  with_padding = np.asarray(apply(params, input_ids=ids, images=images, videos=padded))
  np.testing.assert_allclose(with_padding, base, atol=1e-5)


def test_concat_layout_places_items_at_their_placeholders():
  model = tiny_config(fusion='concat').model
  img = model.image_token_id
  # Text: a <img> b c <img> d [pad]; item 0 has 2 valid tokens, item 1 has 3 (one padding).
  ids = jnp.array([[7, img, 8, 9, img, 10, 0]])
  text_mask = jnp.array([[True] * 6 + [False]])
  visual = VisualTokens(table=jnp.zeros((1, 6, 4)), source=jnp.arange(6)[None],
                        mask=jnp.array([[True, True, False, True, True, True]]),
                        item=jnp.array([[0, 0, 0, 1, 1, 1]]), grids=((1, 3),))
  text_dest, visual_dest, out_pos, length = concat_layout(ids, text_mask, visual, model)
  assert length == 13
  # Merged: a v0 v1 b c w0 w1 w2 d pad
  np.testing.assert_array_equal(text_dest, [[0, 13, 3, 4, 13, 8, 9]])
  np.testing.assert_array_equal(visual_dest, [[1, 2, 13, 5, 6, 7]])
  np.testing.assert_array_equal(out_pos, [[0, 2, 3, 4, 7, 8, 9]])


def test_concat_fusion_runs_with_images_and_videos():
  model, params, apply, ids = _setup({'fusion': 'concat'})
  images = random_images(model, 2, 2, 2)
  videos = dict(random_images(model, 2, 2, 3), frame_item=jnp.ones((2, 2), jnp.int32))
  ids = ids.at[:, 9].set(model.video_token_id)
  logits = apply(params, input_ids=ids, images=images, videos=videos)
  assert logits.shape == (2, 12, model.llm.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
  # Text before the first placeholder sees no visual tokens: equals the text-only logits there.
  text_only = apply(params, input_ids=ids.at[:, 5].set(3).at[:, 9].set(3))
  np.testing.assert_allclose(logits[:, :5], text_only[:, :5], atol=1e-5)


def test_video_frames_pool_to_llava_onevision_grid():
  tokens = jnp.arange(2 * 27 * 27 * 3, dtype=jnp.float32).reshape(2, 27 * 27, 3)
  assert pool_grid(tokens, 2).shape == (2, 196, 3)
