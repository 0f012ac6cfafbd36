"""The data packer (lavi_jax.data.packing): no example lost or cut, segment ids, positions and
item numbers right, clear errors for examples that do not fit a row."""

import numpy as np
import pytest

from lavi_jax.data import packing
from lavi_jax.data.errors import DataError

T, S = 16, 2


def example(n, items=(), ident=None):
  """n text tokens; items: frames per item, video when negative."""
  ids = np.zeros(T, np.int32)
  ids[:n] = 100 + np.arange(n) + (ident or 0) * 1000
  targets = np.zeros(T, np.int32)
  targets[:n - 1] = ids[1:n]
  loss_mask = np.zeros(T, bool)
  loss_mask[n // 2:n - 1] = True
  frame_item = np.array([k for k, f in enumerate(items) for _ in range(abs(f))], np.int32)
  frame_video = np.array([f < 0 for f in items for _ in range(abs(f))], bool)
  frames = np.full((len(frame_item), S, S, 3), ident or 0, np.uint8)
  return dict(id=f'r{ident}', input_ids=ids, text_mask=np.arange(T) < n, targets=targets,
              loss_mask=loss_mask, frames=frames, frame_item=frame_item,
              frame_video=frame_video, question_type=np.int32(0), num_truncated=np.int32(0))


def test_rows_keep_every_example_whole():
  examples = [example(n, items, ident=i) for i, (n, items) in enumerate(
      [(9, (2,)), (5, ()), (7, (-3,)), (3, (1, 1)), (16, ()), (4, (2, -2))])]
  rows = list(packing.pack_rows(examples, T))
  assert len(rows) < len(examples)
  seen = []
  for row in rows:
    segments = row['segment_ids']
    np.testing.assert_array_equal(segments > 0, row['text_mask'])
    assert (np.diff(segments[row['text_mask']]) >= 0).all()  # conversations are contiguous
    for s in range(1, segments.max() + 1):
      where = np.flatnonzero(segments == s)
      ident = (row['input_ids'][where[0]] - 100) // 1000
      original = examples[ident]
      n = len(where)
      np.testing.assert_array_equal(row['positions'][where], np.arange(n))
      for k in packing.TEXT_KEYS:
        np.testing.assert_array_equal(row[k][where], original[k][:n])
      frames = row['frame_segment'] == s
      np.testing.assert_array_equal(row['frames'][frames], original['frames'])
      np.testing.assert_array_equal(row['frame_video'][frames], original['frame_video'])
      items = row['frame_item'][frames]
      if len(items):
        np.testing.assert_array_equal(items - items.min(), original['frame_item'])
      seen.append(int(ident))
    # One item numbering per row, in order: items of later conversations come after.
    assert (np.diff(row['frame_item']) >= 0).all()
    assert row['positions'][~row['text_mask']].sum() == 0
  assert sorted(seen) == list(range(len(examples)))


def test_visual_budget_opens_new_rows():
  examples = [example(2, (3,), ident=i) for i in range(4)]
  rows = list(packing.pack_rows(examples, T, max_frames=4))
  assert [len(r['frame_item']) for r in rows] == [3, 3, 3, 3]
  tokens_of = lambda video: 5 if video else 2
  examples = [example(2, (-2,), ident=i) for i in range(3)]
  rows = list(packing.pack_rows(examples, T, max_tokens=20, tokens_of=tokens_of))
  assert [int(r['segment_ids'].max()) for r in rows] == [2, 1]


def test_open_rows_bound():
  examples = [example(9, ident=i) for i in range(5)]
  rows = list(packing.pack_rows(examples, T, open_rows=2))
  assert len(rows) == 5 and all(r['segment_ids'].max() == 1 for r in rows)


def test_oversized_example_is_named():
  with pytest.raises(DataError, match=r"example 1 \(id 'r7'\).*frames_per_row"):
    list(packing.pack_rows([example(3, (1,)), example(3, (5,), ident=7)], T, max_frames=4))
  with pytest.raises(DataError, match=r"id 'r3'.*tokens_per_row"):
    list(packing.pack_rows([example(3, (-2,), ident=3)], T, max_tokens=4,
                           tokens_of=lambda video: 3))


# Model: a packed row gives each conversation the logits (and so the loss) it gets alone.

MODEL_SETTINGS = {
    'attention': {'viln.conditioner': 'attention'},
    'mlp': {'viln.conditioner': 'mlp'},
    'conv': {'viln.conditioner': 'conv', 'viln.kv_groups': 2},
    'concat': {'fusion': 'concat'},
}


@pytest.mark.parametrize('name', list(MODEL_SETTINGS))
def test_packed_row_equals_each_conversation_alone(name):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from lavi_jax.models import LaVi
  from tests.helpers import perturb, random_images, random_params, tiny_config

  model = tiny_config(**MODEL_SETTINGS[name]).model
  params = perturb(random_params(model))
  apply = jax.jit(lambda p, **kw: LaVi(model).apply({'params': p}, **kw))
  img, vid, t = model.image_token_id, model.video_token_id, 16
  a = [10, img, 11, 12, vid, 13, 14]  # image item 0, video item 1
  b = [20, vid, 21, img, 22, 23]  # video item 0, image item 1
  frames = random_images(model, 1, 7, 3)['pixel_values']  # a: 1 crop, 2 frames; b: 2 + 2

  def row(*ids):
    flat = [i for part in ids for i in part]
    return jnp.array([flat + [0] * (t - len(flat))], jnp.int32), jnp.array(
        [[True] * len(flat) + [False] * (t - len(flat))])

  def kind(pixels, items):
    return dict(pixel_values=pixels[None], frame_item=jnp.array([items], jnp.int32))

  ids, mask = row(a)
  alone_a = apply(params, input_ids=ids, text_mask=mask,
                  images=kind(frames[0, :1], [0]), videos=kind(frames[0, 1:3], [1, 1]))
  ids, mask = row(b)
  alone_b = apply(params, input_ids=ids, text_mask=mask,
                  images=kind(frames[0, 5:6], [1]), videos=kind(frames[0, 3:5], [0, 0]))
  ids, mask = row(a, b)
  segment_ids = jnp.array([[1] * len(a) + [2] * len(b) + [0] * (t - len(a) - len(b))])
  packed = apply(params, input_ids=ids, text_mask=mask, segment_ids=segment_ids,
                 images=kind(jnp.concatenate([frames[0, :1], frames[0, 5:6]]), [0, 3]),
                 videos=kind(frames[0, 1:5], [1, 1, 2, 2]))
  # float32 sums over the row's longer visual sequence (masked means, softmax) round
  # differently: up to ~3e-5 on logits of order 1; a leak between conversations is ~1e-1.
  tol = dict(atol=5e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[0, :len(a)], alone_a[0, :len(a)], **tol)
  np.testing.assert_allclose(packed[0, len(a):len(a) + len(b)], alone_b[0, :len(b)], **tol)
  # The loss of a packed batch sums the conversations' losses (targets and loss mask are per
  # conversation; the step reads segment_ids from the batch).
  from lavi_jax.train import step as step_lib
  from lavi_jax.models import LaVi as lavi_model

  def loss(ids, mask, images, videos, cut=None, **extra):
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((1, 1), jnp.int32)], 1)
    loss_mask = mask & jnp.roll(mask, -1, 1)
    if cut is not None:  # targets must not cross a boundary: a's last token predicts nothing
      loss_mask &= jnp.arange(t) != cut
    batch = dict(input_ids=ids, text_mask=mask, images=images, videos=videos, targets=targets,
                 loss_mask=loss_mask, **extra)
    return step_lib.loss_sums(lavi_model(model), params, batch, chunk=8)

  nll_a, (count_a, _) = loss(*row(a), kind(frames[0, :1], [0]), kind(frames[0, 1:3], [1, 1]))
  nll_b, (count_b, _) = loss(*row(b), kind(frames[0, 5:6], [1]), kind(frames[0, 3:5], [0, 0]))
  ids, mask = row(a, b)
  nll, (count, _) = loss(ids, mask,
                         kind(jnp.concatenate([frames[0, :1], frames[0, 5:6]]), [0, 3]),
                         kind(frames[0, 1:5], [1, 1, 2, 2]), cut=len(a) - 1,
                         segment_ids=segment_ids)
  assert int(count) == int(count_a) + int(count_b)
  np.testing.assert_allclose(nll, nll_a + nll_b, rtol=1e-5)
  # Vision reaches the text: the test would not notice a conversation seeing no items.
  text_only = apply(params, input_ids=row(a)[0], text_mask=row(a)[1])
  assert np.abs(np.asarray(text_only[0, 2:7]) - np.asarray(alone_a[0, 2:7])).max() > 1e-4
