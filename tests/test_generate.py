"""KV-cache decoding: cached logits equal a full forward pass, batched rows decode as alone,
stop tokens, limits, streaming, and the sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax.inference import decode, sampling
from lavi_jax.models import LaVi
from tests.helpers import random_images, random_params, tiny_config

N = 5  # new tokens
SMALL = {'vision.image_size': 32}  # 16 tokens per image crop, 4 per (pooled) video frame
NO_STOP = [-1]  # keeps the shapes of the runs with one stop token (no recompilation)


def _model(**overrides):
  model = tiny_config(**SMALL, **overrides).model
  return model, random_params(model)


def _prompts(model, lengths, seed=1):
  """Right-padded ids (B, T) with an image placeholder at 1 and a video placeholder at 4."""
  ids = np.array(jax.random.randint(jax.random.key(seed), (len(lengths), max(lengths)), 3,
                                    model.llm.vocab_size))
  ids[:, 1], ids[:, 4] = model.image_token_id, model.video_token_id
  mask = np.arange(ids.shape[1])[None] < np.array(lengths)[:, None]
  return np.where(mask, ids, 0), mask


def _visual(model, batch):
  """Item 0: an image of 2 crops; item 1: a video of 3 frames (the last one padding)."""
  images = random_images(model, batch, 2, 2)
  videos = dict(random_images(model, batch, 3, 3), frame_item=jnp.ones((batch, 3), jnp.int32),
                frame_mask=jnp.array([[True, True, False]] * batch))
  return images, videos


@pytest.mark.parametrize('overrides', [
    {'viln.conditioner': 'attention', 'viln.kv_groups': 2},
    {'viln.conditioner': 'conv', 'viln.every': 2, 'scan_layers': False},
    {'fusion': 'concat'},
], ids=['attention-scanned', 'conv-unscanned', 'concat'])
def test_cached_logits_equal_full_forward(overrides):
  model, params = _model(**overrides)
  lengths = [9, 6]
  ids, mask = _prompts(model, lengths)
  images, videos = _visual(model, 2)
  out = decode.generate(model, params, ids, mask, images=images, videos=videos,
                        max_new_tokens=N, keep_logits=True)
  assert (out.length == N).all() and not out.stopped.any()
  if model.fusion == 'concat':  # a generated placeholder would be expanded by the full pass
    assert not np.isin(out.tokens, [model.image_token_id, model.video_token_id]).any()
  # The whole sequences (prompt + answer), right padded, in one forward pass.
  full = np.zeros((2, max(lengths) + N), np.int32)
  for b, n in enumerate(lengths):
    full[b, :n], full[b, n:n + N] = ids[b, :n], out.tokens[b]
  full_mask = np.arange(full.shape[1])[None] < np.array(lengths)[:, None] + N
  logits = jax.jit(LaVi(model).apply)({'params': params}, full, full_mask, images=images,
                                      videos=videos)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(out.logits[b], logits[b, n - 1:n - 1 + N], rtol=0, atol=1e-4)


@pytest.fixture(scope='module')
def batch():
  """An attention-conditioned LaVi and three prompts of different lengths, two decoded
  greedily (one with a limit of 2 tokens) and one sampled."""
  model, params = _model()
  lengths = [7, 11, 5]
  ids, mask = _prompts(model, lengths, seed=4)
  images, videos = _visual(model, 3)
  settings = dict(temperature=np.array([0.0, 0.0, 0.8]), top_k=np.array([0, 0, 20]),
                  top_p=np.array([1.0, 1.0, 0.9]), seeds=np.array([0, 0, 3]),
                  limit=np.array([N, 2, N]))
  inputs = dict(input_ids=ids, text_mask=mask, images=images, videos=videos)
  run = lambda **kw: decode.generate(model, params, **inputs, max_new_tokens=N, **settings, **kw)
  return dict(model=model, params=params, lengths=lengths, inputs=inputs, settings=settings,
              run=run, out=run(stop_ids=NO_STOP))


def test_batched_rows_decode_as_alone(batch):
  out, inputs, settings = batch['out'], batch['inputs'], batch['settings']
  np.testing.assert_array_equal(out.length, [N, 2, N])
  assert (out.tokens[1, 2:] == 0).all()  # pad after the limit
  for b, n in enumerate(batch['lengths']):
    row = lambda x: x[b:b + 1]
    alone = decode.generate(
        batch['model'], batch['params'], row(inputs['input_ids'])[:, :n],
        row(inputs['text_mask'])[:, :n], images=jax.tree.map(row, inputs['images']),
        videos=jax.tree.map(row, inputs['videos']), max_new_tokens=N,
        **jax.tree.map(row, settings))
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[b])


def test_stop_tokens_end_rows(batch):
  free = batch['out']
  stop = free.tokens[0, 2]
  stopped = batch['run'](stop_ids=[stop], pad_id=-1)
  for b, row in enumerate(free.tokens[:, :free.length.max()]):
    hits = np.flatnonzero(row[:free.length[b]] == stop)
    end = hits[0] + 1 if len(hits) else free.length[b]
    assert stopped.length[b] == end and stopped.stopped[b] == bool(len(hits))
    np.testing.assert_array_equal(stopped.tokens[b, :end], free.tokens[b, :end])
    assert (stopped.tokens[b, end:] == -1).all()


def test_streaming_sees_the_tokens_in_chunks(batch):
  seen = []
  out = batch['run'](stop_ids=NO_STOP, stream_every=2,
                     on_tokens=lambda tokens, length, done: seen.append((tokens, length, done)))
  assert [t.shape[1] for t, _, _ in seen] == [1, 3, 5]
  np.testing.assert_array_equal(out.tokens, batch['out'].tokens)
  tokens, length, done = seen[-1]
  np.testing.assert_array_equal(tokens, out.tokens)
  np.testing.assert_array_equal(length, out.length)
  assert done.all() and not seen[0][2].any()


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4))
  keys = jax.vmap(jax.random.key)(jnp.arange(4, dtype=jnp.uint32))

  def draws(temperature, top_k, top_p, n=200):
    pick = jax.jit(lambda k: sampling.sample(logits, k, jnp.full(4, temperature),
                                             jnp.full(4, top_k), jnp.full(4, top_p)))
    return np.stack([pick(jax.vmap(jax.random.fold_in, (0, None))(keys, i))
                     for i in range(n)]).ravel()

  assert set(draws(0.0, 0, 1.0, 3)) == {0}  # greedy
  assert set(draws(1.0, 1, 1.0, 10)) == {0}  # top-1
  assert set(draws(1.0, 2, 1.0)) == {0, 1}
  assert set(draws(1.0, 0, 0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert set(draws(1.0, 3, 0.5)) == {0}
  assert set(draws(1.0, 0, 1.0)) == {0, 1, 2, 3}
  frequencies = np.bincount(draws(1.0, 2, 1.0, 500), minlength=4) / 2000
  np.testing.assert_allclose(frequencies[:2], [0.625, 0.375], atol=0.04)  # renormalised top-2
