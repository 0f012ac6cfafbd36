"""KV-cache decoding: prefill the prompts, then a jitted `lax.while_loop` over new tokens.

Shapes: B batch, T prompt length (right padded), L prefill length (T; for fusion='concat'
T + N, the visual tokens inlined), N max new tokens, S = L + N cache slots, V vocabulary.

- Prefill runs the prompts through the model once, writing slots 0..L-1 of the cache. For LaVi
  (fusion='viln') the cache holds text tokens only; the conditioners' visual memory
  (`LaVi.visual_memory`) is computed here once and reused at every step, where only the cheap
  per-token part (`viln.token_conditioning`) is recomputed. For fusion='concat' the merged
  sequence (`LaVi.concat_inputs`) is prefilled, so the visual tokens sit in the cache.
- Step i writes every row's newest token into slot L + i - 1 (the same slot for all rows). Rows
  are right padded, so a shorter prompt leaves masked slots between its prompt and its answer;
  its positions (RoPE) continue from its own length, so it decodes as it would alone.
- Streaming: the loop runs in chunks (`stream_every` tokens per call of the same compiled
  function, which stops early once every row is done); `on_tokens` is called on the host after
  each chunk. Without a callback the whole answer is one call. Chunks rather than
  `jax.debug.callback` keep host callbacks out of compiled code (and of multi-device programs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lavi_jax.inference import sampling
from lavi_jax.inference.serving import Placement
from lavi_jax.models.attention import Mask
from lavi_jax.models.layers import constrain
from lavi_jax.models.lavi import LaVi, VisualInput, count_items_so_far, is_placeholder
from lavi_jax.models.llm import KVCache
from lavi_jax.models.viln import VisualMemory, token_conditioning


@flax.struct.dataclass
class DecodeState:
  """The decode loop's carry."""
  cache: KVCache
  valid: jax.Array  # (B, S) bool: the slot holds one of the row's tokens
  position: jax.Array  # (B,) int32: position of the newest token (not yet in the cache)
  items: jax.Array  # (B,) int32: visual items seen by the last token in the cache
  tokens: jax.Array  # (B, N) int32: generated tokens, `pad_id` after a row is done
  length: jax.Array  # (B,) int32: tokens generated per row (its stop token included)
  done: jax.Array  # (B,) bool
  step: jax.Array  # () int32: columns of `tokens` filled
  logits: jax.Array | None  # (B, N, V) float32 at each generated token, when kept


@dataclasses.dataclass
class Output:
  """tokens (B, N) (pad after each row's end), length (B,), stopped (B,) bool (ended with a stop
  token, else ran out of new tokens), logits (B, N, V) when kept."""
  tokens: np.ndarray
  length: np.ndarray
  stopped: np.ndarray
  logits: np.ndarray | None = None


def _prefill(m: LaVi, input_ids, text_mask, images, videos, new_tokens: int):
  """Runs the prompts; returns (last logits (B, V), cache, valid slots (B, S), next position (B,),
  items seen at the end of each prompt (B,), visual memory)."""
  b = input_ids.shape[0]
  lengths = text_mask.sum(axis=1).astype(jnp.int32)
  visual = m.encode_visual(images, videos)
  memory = cond = None
  items = jnp.zeros((b,), jnp.int32)
  if m.cfg.fusion == 'concat' and visual is not None:
    embeds, valid, out_pos = m.concat_inputs(input_ids, text_mask, visual)
    last = jnp.take_along_axis(out_pos, lengths[:, None] - 1, axis=1)[:, 0]
  else:
    embeds, valid, last = m.llm.embed(input_ids), text_mask, lengths - 1
    token_items = count_items_so_far(input_ids, m.cfg)
    items = jnp.take_along_axis(token_items, last[:, None], axis=1)[:, 0]
    if m.cfg.fusion == 'viln':
      memory = m.visual_memory(visual)
      cond = None if memory is None else token_conditioning(memory, token_items)
  length = embeds.shape[1]
  slots = length + new_tokens
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, slots - length)])
  cache = KVCache.zeros(m.cfg, b, slots)
  kv_axes = ('layers', 'batch', 'length', 'kv_heads', 'head_dim')
  cache = cache.replace(k=constrain(cache.k, kv_axes), v=constrain(cache.v, kv_axes))
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  mask = pad(Mask.causal_padded(valid).dense())
  hidden, cache = m.llm.hidden_states(embeds, positions, mask, cond, cache)
  logits = m.llm.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]
  return logits, cache, pad(valid), last + 1, items, memory


def _step(m: LaVi, tokens, positions, mask, cache: KVCache, memory: VisualMemory | None,
          items):
  """One token per row: tokens, positions, items (B, 1), mask (B, 1, S) -> (logits (B, V),
  cache)."""
  cond = None if memory is None else token_conditioning(memory, items)
  hidden, cache = m.llm.hidden_states(m.llm.embed(tokens), positions, mask, cond, cache)
  return m.llm.logits(hidden)[:, 0], cache


def _choose(logits, step, keys, settings):
  step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
  return sampling.sample(logits, step_keys, settings['temperature'], settings['top_k'],
                         settings['top_p'])


def _record(state: DecodeState, logits, token, settings) -> DecodeState:
  """Stores the token chosen at column `state.step` (pad for rows already done)."""
  token = jnp.where(state.done, settings['pad_id'], token)
  generated = state.length + ~state.done
  stop = jnp.isin(token, settings['stop_ids']) & ~state.done
  kept = None
  if state.logits is not None:
    kept = jax.lax.dynamic_update_slice_in_dim(state.logits, logits[:, None], state.step, 1)
  return state.replace(
      tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, 1),
      length=generated, done=state.done | stop | (generated >= settings['limit']),
      step=state.step + 1, logits=kept)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'keep_logits'))
def _start(model: ml_collections.FrozenConfigDict, params, input_ids, text_mask, images, videos,
           keys, settings, max_new_tokens: int, keep_logits: bool):
  """Prefill and the first new token -> (DecodeState, visual memory)."""
  b = input_ids.shape[0]
  logits, cache, valid, position, items, memory = LaVi(model).apply(
      {'params': params}, input_ids, text_mask, images, videos, max_new_tokens, method=_prefill)
  state = DecodeState(
      cache=cache, valid=valid, position=position, items=items,
      tokens=jnp.full((b, max_new_tokens), settings['pad_id'], jnp.int32),
      length=jnp.zeros((b,), jnp.int32), done=settings['limit'] <= 0, step=jnp.int32(0),
      logits=(jnp.zeros((b, max_new_tokens, logits.shape[-1]), jnp.float32)
              if keep_logits else None))
  return _record(state, logits, _choose(logits, 0, keys, settings), settings), memory


@functools.partial(jax.jit, static_argnames='model', donate_argnames='state')
def _decode(model: ml_collections.FrozenConfigDict, params, memory, state: DecodeState, keys,
            settings, until):
  """Decodes until `until` tokens per row are generated or every row is done."""

  def step(state: DecodeState) -> DecodeState:
    token = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)
    items = state.items + is_placeholder(token[:, 0], model)
    valid = jax.lax.dynamic_update_slice_in_dim(
        state.valid, jnp.ones((state.valid.shape[0], 1), bool), state.cache.index, 1)
    logits, cache = LaVi(model).apply(
        {'params': params}, token, state.position[:, None], valid[:, None, :], state.cache,
        memory, items[:, None], method=_step)
    state = state.replace(cache=cache, valid=valid, position=state.position + 1, items=items)
    return _record(state, logits, _choose(logits, state.step, keys, settings), settings)

  return jax.lax.while_loop(lambda s: (s.step < until) & ~jnp.all(s.done), step, state)


def _sampling_inputs(b: int, max_new_tokens: int, limit, temperature, top_k, top_p, seeds,
                     stop_ids, pad_id: int):
  """Per-row sampling keys (B,) and the settings dict of `_start` / `_decode`."""
  row = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), (b,))
  settings = dict(temperature=row(temperature, jnp.float32), top_k=row(top_k, jnp.int32),
                  top_p=row(top_p, jnp.float32),
                  limit=row(max_new_tokens if limit is None else limit, jnp.int32),
                  stop_ids=jnp.asarray(stop_ids, jnp.int32).reshape(-1),
                  pad_id=jnp.int32(pad_id))
  return jax.vmap(jax.random.key)(row(seeds, jnp.uint32)), settings


def generate(model: ml_collections.ConfigDict, params, input_ids, text_mask,
             images: VisualInput | None = None, videos: VisualInput | None = None, *,
             max_new_tokens: int, limit: np.ndarray | None = None, temperature=0.0, top_k=0,
             top_p=1.0, seeds=0, stop_ids=(), pad_id: int = 0, keep_logits: bool = False,
             on_tokens: Callable[[np.ndarray, np.ndarray, np.ndarray], Any] | None = None,
             stream_every: int = 1, placement: Placement | None = None) -> Output:
  """Generates up to `max_new_tokens` (N) tokens per row after each prompt.

  input_ids, text_mask (B, T), right padded; images / videos as for LaVi. Per row (scalars
  broadcast): `limit` (B,) new tokens at most (default N; 0 gives nothing), `temperature`,
  `top_k`, `top_p`, `seeds` (see sampling.SamplingParams). A row ends at a token of
  `stop_ids` (kept in its output). After every `stream_every` tokens,
  `on_tokens(tokens (B, n), length (B,), done (B,))` gets the tokens so far (row b's are
  tokens[b, :length[b]]). Compiled functions are shared by every call with the same model
  config and shapes.

  `placement`: the mesh `params` are laid out on (`Placement.place`; B a multiple of its batch
  shards); the prompts, cache and visual memory are split over it. None: one device.
  """
  with placement.activate() if placement else contextlib.nullcontext():
    model = ml_collections.FrozenConfigDict(model)
    b = input_ids.shape[0]
    keys, settings = _sampling_inputs(b, max_new_tokens, limit, temperature, top_k, top_p, seeds,
                                      stop_ids, pad_id)
    state, memory = _start(model, params, jnp.asarray(input_ids), jnp.asarray(text_mask, bool),
                           images, videos, keys, settings, max_new_tokens=max_new_tokens,
                           keep_logits=keep_logits)
    chunk = stream_every if on_tokens else max_new_tokens
    while True:
      step = int(state.step)
      done = np.asarray(state.done)
      if on_tokens:
        on_tokens(np.asarray(state.tokens[:, :step]), np.asarray(state.length), done)
      if step >= max_new_tokens or done.all():
        break
      state = _decode(model, params, memory, state, keys, settings,
                      jnp.int32(min(step + chunk, max_new_tokens)))
    tokens = np.asarray(state.tokens)
    length = np.asarray(state.length)
    last = tokens[np.arange(b), np.maximum(length - 1, 0)]
    return Output(tokens=tokens, length=length,
                  stopped=(length > 0) & np.isin(last, np.asarray(stop_ids)),
                  logits=None if state.logits is None else np.asarray(state.logits))


def programs(model: ml_collections.ConfigDict, params, input_ids, text_mask,
             images: VisualInput | None = None, videos: VisualInput | None = None, *,
             max_new_tokens: int, placement: Placement | None = None
             ) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
  """The (prefill, decode loop) programs that greedy `generate` runs for these inputs, lowered
  ahead of time (`.compile()` them for XLA's memory and cost analyses). Arguments may be
  ShapeDtypeStructs. The prefill's `out_info` is (the decode state, with its KV cache; the
  visual memory)."""
  model = ml_collections.FrozenConfigDict(model)
  keys, settings = _sampling_inputs(input_ids.shape[0], max_new_tokens, None, 0.0, 0, 1.0, 0, (),
                                    0)
  with placement.activate() if placement else contextlib.nullcontext():
    prefill = _start.lower(model, params, input_ids, text_mask, images, videos, keys, settings,
                           max_new_tokens=max_new_tokens, keep_logits=False)
    state, memory = prefill.out_info
    loop = _decode.lower(model, params, memory, state, keys, settings, np.int32(max_new_tokens))
  return prefill, loop
