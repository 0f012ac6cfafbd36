"""LaVi in PyTorch: transformers' Qwen2/LLaMA and SigLIP modules, the LLM's norms wrapped by ViLN.

    model = LaVi.from_pretrained('EXPORT_DIR')           # a convert.to_torch output
    logits = model(input_ids, text_mask, images=dict(pixel_values=...))
    tokens, lengths = model.generate(input_ids, text_mask, videos=..., max_new_tokens=32)

Shapes and inputs are those of `lavi_jax.models.lavi` (channels-last pixels, uint8 or float in
[-1, 1]; padded per kind, no frame pools): B batch, T text length, F crops/frames, S image side,
N visual tokens, C = d_ctx, D LLM width, V vocabulary; `images=` / `videos=` dicts of
`pixel_values (B, F, S, S, 3)`, optional `frame_mask` (B, F) and `frame_item` (B, F). Each class and function says which JAX one it mirrors; the
numerics follow them (norm statistics, softmax and the ViLN deltas in float32).

Module names are the export's tensor names (`hf.export_tensor_map`): `model` (Qwen2Model /
LlamaModel), `lm_head`, `vision_tower` (SiglipVisionModel), `multi_modal_projector`,
`frame_index`, `conditioners` (`context`, `layers.{l}.{norm}`, `norm`). A ViLN keeps its norm's
`weight` where the RMSNorm had it and uses the conditioner under `conditioners.` without owning
it, so the LLM's weights keep the Qwen2/LLaMA names. Exports with fusion='concat' (LLaVA layout)
load too, their `language_model.` prefix renamed.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch import nn

from lavi_jax import config as lavi_config

VisualInput = dict[str, Any]
_LLMS = {'qwen2': (transformers.Qwen2Config, transformers.Qwen2Model),
         'llama': (transformers.LlamaConfig, transformers.LlamaModel)}
_RENAMES = {'llava': (('language_model.model.', 'model.'),
                      ('language_model.lm_head.', 'lm_head.'))}


def gelu_tanh(x):
  """flax `nn.gelu` (its default, tanh approximation)."""
  return F.gelu(x, approximate='tanh')


def layer_norm(norm: nn.LayerNorm, x):
  """layers.LayerNorm: statistics and affine in float32, result in x's dtype."""
  return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                      norm.eps).to(x.dtype)


def rms_normalize(h, eps: float):
  """layers.rms_normalize: h / rms(h) in float32."""
  h = h.float()
  return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def attention(q, k, v, allowed):
  """layers.attention for equal head counts: q (B, T, H, Dh), k, v (B, N, H, Dh), allowed
  (B, T, N) bool -> (B, T, H, Dh); softmax in float32, rows with nothing allowed give zeros."""
  scores = torch.einsum('bthd,bnhd->bhtn', q.float(), k.float()) * q.shape[-1] ** -0.5
  mask = allowed[:, None]
  scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
  probs = scores.softmax(-1) * mask.any(-1, keepdim=True)
  return torch.einsum('bhtn,bnhd->bthd', probs.to(v.dtype), v)


def masked_mean(allowed, tokens):
  """viln.masked_mean: allowed (B, T, N), tokens (B, N, C) -> (B, T, C) (0 where none)."""
  weights = allowed.to(tokens.dtype)
  return weights @ tokens / weights.sum(-1, keepdim=True).clamp(min=1)


def pool_grid(tokens, stride: int):
  """lavi.pool_grid: (M, g*g, D) -> (M, ceil(g/stride)^2, D), bilinear (half-pixel centres)."""
  m, p, d = tokens.shape
  g = round(p ** 0.5)
  out = -(-g // stride)
  grid = tokens.reshape(m, g, g, d).permute(0, 3, 1, 2)
  pooled = F.interpolate(grid, size=(out, out), mode='bilinear', align_corners=False)
  return pooled.permute(0, 2, 3, 1).reshape(m, out * out, d)


def index_within_item(frame_item):
  """models.visual.index_within_item: (B, F) -> (B, F) earlier frames of the same item."""
  same = frame_item[:, :, None] == frame_item[:, None, :]
  earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=same.device).tril(-1)
  return (same & earlier).sum(-1)


class Projector(nn.Module):
  """projector.Projector: linear_2(gelu(linear_1(x))), exact GELU."""

  def __init__(self, d_in: int, c: int):
    super().__init__()
    self.linear_1, self.linear_2 = nn.Linear(d_in, c), nn.Linear(c, c)

  def forward(self, x):
    return self.linear_2(F.gelu(self.linear_1(x)))


class ConvMixer(nn.Module):
  """viln.ConvMixer: per frame grid, x + LN1(gelu(depthwise(x))), then LN2(gelu(pointwise(.)))."""

  def __init__(self, c: int, kernel: int):
    super().__init__()
    self.depthwise = nn.Conv2d(c, c, kernel, padding=kernel // 2, groups=c)
    self.norm1, self.norm2 = nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c, eps=1e-6)
    self.pointwise = nn.Linear(c, c)

  def forward(self, tokens, segments):
    """tokens (B, N, C), segments ((F, h, w), ...) laying out N -> (B, N, C)."""
    b, _, c = tokens.shape
    pieces, start = [], 0
    for f, h, w in segments:
      grid = tokens[:, start:start + f * h * w].reshape(b * f, h, w, c)
      conv = self.depthwise(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
      grid = grid + layer_norm(self.norm1, gelu_tanh(conv))
      pieces.append(grid.reshape(b, f * h * w, c))
      start += f * h * w
    return layer_norm(self.norm2, gelu_tanh(self.pointwise(torch.cat(pieces, 1))))


class ViLNContext(nn.Module):
  """viln.ViLNContext: visual tokens -> the memory every conditioner reads."""

  def __init__(self, viln: dict, c: int):
    super().__init__()
    self.kind, self.groups, self.heads = viln['conditioner'], viln['kv_groups'], (
        viln['heads'], viln['head_dim'])
    width = self.groups * viln['heads'] * viln['head_dim']
    if self.kind == 'attention':
      self.k_proj, self.v_proj = nn.Linear(c, width), nn.Linear(c, width)
    elif self.kind == 'conv':
      self.conv_mixer = nn.ModuleList(ConvMixer(c, viln['conv_kernel'])
                                      for _ in range(self.groups))

  def forward(self, tokens, mask, item, segments) -> dict[str, Any]:
    """tokens (B, N, C), mask/item (B, N) -> {'mask', 'item'; 'k', 'v' (G, B, N, Hc, Dc) |
    'tokens' (B, N, C) | 'mixed' (G, B, N, C)}."""
    out = {'mask': mask, 'item': item}
    b, n, _ = tokens.shape
    if self.kind == 'attention':
      for name, proj in (('k', self.k_proj), ('v', self.v_proj)):
        out[name] = proj(tokens).reshape(b, n, self.groups, *self.heads).permute(2, 0, 1, 3, 4)
    elif self.kind == 'mlp':
      out['tokens'] = tokens
    else:
      out['mixed'] = torch.stack([mixer(tokens, segments) for mixer in self.conv_mixer])
    return out


def token_conditioning(memory: dict[str, Any], token_items) -> dict[str, Any]:
  """viln.token_conditioning: what text tokens that have seen `token_items` (B, T) items read."""
  allowed = memory['mask'][:, None, :] & (memory['item'][:, None, :] < token_items[:, :, None])
  out = {'allowed': allowed, 'has_visual': allowed.any(-1)}
  if 'k' in memory:
    out['k'], out['v'] = memory['k'], memory['v']
  elif 'mixed' in memory:
    out['summary'] = torch.stack([masked_mean(allowed, m) for m in memory['mixed']])
  else:
    out['summary'] = masked_mean(allowed, memory['tokens'])[None]
  return out


class Conditioner(nn.Module):
  """viln.Conditioner: x (B, T, D) normalised text, cond, group -> (dg, db) (B, T, D) float32."""

  def __init__(self, viln: dict, d: int, c: int):
    super().__init__()
    self.viln = viln
    hc = viln['heads'] * viln['head_dim']
    if viln['conditioner'] == 'attention':
      self.q_proj, self.o_proj = nn.Linear(d, hc, bias=False), nn.Linear(hc, 2 * d)
    else:
      self.fc1, self.fc2 = nn.Linear(d + c, viln['mlp_dim']), nn.Linear(viln['mlp_dim'], 2 * d)
    if viln['gate'] == 'tanh':
      self.gate = nn.Parameter(torch.zeros(()))

  def forward(self, x, cond, group: int):
    viln = self.viln
    b, t, d = x.shape
    if viln['conditioner'] == 'attention':
      q = self.q_proj(x).reshape(b, t, viln['heads'], viln['head_dim'])
      a = attention(q, cond['k'][group], cond['v'][group], cond['allowed'])
      delta = self.o_proj(a.reshape(b, t, -1))
    else:
      summary = cond['summary'][min(group, cond['summary'].shape[0] - 1)]
      delta = self.fc2(gelu_tanh(self.fc1(torch.cat([x, summary.to(x.dtype)], -1))))
    delta = delta.float().reshape(b, t, 2, d)
    if viln['gate'] == 'tanh':
      delta = delta * torch.tanh(self.gate.float())
    if viln['delta_clip'] > 0:
      delta = viln['delta_clip'] * torch.tanh(delta / viln['delta_clip'])
    delta = delta * cond['has_visual'][..., None, None]
    return delta[..., 0, :], delta[..., 1, :]


class Conditioners(nn.Module):
  """The ViLN conditioners: `context`, `layers[l][norm name]`, `norm` (final, if modulated)."""

  def __init__(self, model: Any, d: int, c: int):
    super().__init__()
    viln = dict(model.viln)
    self.context = ViLNContext(viln, c)
    norms = [lavi_config.NORM_OF_SUBLAYER[s] for s in ('attn', 'mlp') if s in viln['sublayers']]
    self.layers = nn.ModuleDict({
        str(l): nn.ModuleDict({norm: Conditioner(viln, d, c) for norm in norms})
        for l, modulated in enumerate(lavi_config.modulated_layers(model)) if modulated})
    if 'final' in viln['sublayers']:
      self.norm = Conditioner(viln, d, c)


class ViLNState:
  """The conditioning the ViLN norms read during one LLM call (None: plain RMSNorms)."""
  cond: dict[str, Any] | None = None


class ViLN(nn.Module):
  """viln.ViLN in place of an RMSNorm: (g + dg) * x + db, x = h / rms(h); h (B, T, D).

  Owns the norm's `weight`; the conditioner is used, not owned (it lives under `conditioners.`).
  """

  def __init__(self, norm: nn.Module, conditioner: Conditioner, group: int, state: ViLNState):
    super().__init__()
    self.weight, self.variance_epsilon, self.group = norm.weight, norm.variance_epsilon, group
    object.__setattr__(self, 'conditioner', conditioner)  # not a submodule
    object.__setattr__(self, 'state', state)

  def forward(self, h):
    x = rms_normalize(h, self.variance_epsilon)
    cond = self.state.cond
    if cond is None:
      return self.weight * x.to(h.dtype)
    dg, db = self.conditioner(x.to(h.dtype), cond, self.group)
    return ((self.weight.float() + dg) * x + db).to(h.dtype)


def _hf_configs(config: dict[str, Any]):
  """config.json -> (LaVi model config, transformers text config, SigLIP vision config)."""
  model = lavi_config.from_export_config(config, 'the export')
  text = dict(config['text_config'])
  if text.get('model_type') not in _LLMS:
    raise ValueError(f'text_config.model_type={text.get("model_type")!r}: supported are '
                     f'{sorted(_LLMS)}')
  text_config = _LLMS[text['model_type']][0](**text)
  vision_config = transformers.SiglipVisionConfig(**config['vision_config'])
  return model, text_config, vision_config


class LaVi(nn.Module):
  """lavi.LaVi in PyTorch. `LaVi.from_pretrained(folder)` loads a convert.to_torch export."""

  def __init__(self, config: dict[str, Any]):
    """config: the export's config.json (dict)."""
    super().__init__()
    self.config = config
    self.lavi, text_config, vision_config = _hf_configs(config)
    model = self.lavi
    d, c = text_config.hidden_size, lavi_config.ctx_dim(model)
    self.model = _LLMS[text_config.model_type][1](text_config)
    self.lm_head = (None if model.llm.tie_word_embeddings else
                    nn.Linear(d, text_config.vocab_size, bias=False))
    self.vision_tower = transformers.SiglipVisionModel(vision_config)
    self.multi_modal_projector = Projector(
        vision_config.hidden_size * len(model.vision.feature_layers), c)
    self.frame_index = nn.Embedding(model.projector.max_frames, c)
    self.state = ViLNState()
    if model.fusion == 'viln':
      self.conditioners = Conditioners(model, d, c)
      self._wrap_norms()

  def _wrap_norms(self):
    """Replaces the modulated norms of the LLM by ViLNs sharing their weights."""
    n, groups = len(self.model.layers), self.lavi.viln.kv_groups
    for l, layer_conditioners in self.conditioners.layers.items():
      layer = self.model.layers[int(l)]
      for name, conditioner in layer_conditioners.items():
        setattr(layer, name, ViLN(getattr(layer, name), conditioner,
                                  lavi_config.group_of_layer(int(l), n, groups), self.state))
    if hasattr(self.conditioners, 'norm'):
      self.model.norm = ViLN(self.model.norm, self.conditioners.norm,
                             lavi_config.group_of_layer(n - 1, n, groups), self.state)

  @classmethod
  def from_pretrained(cls, path: str | pathlib.Path, dtype: torch.dtype | None = None) -> LaVi:
    """Loads a convert.to_torch export (every tensor must be there) in `dtype` (default: the
    export's)."""
    folder = pathlib.Path(path)
    config = json.loads((folder / 'config.json').read_text())
    index = folder / 'model.safetensors.index.json'
    files = (sorted(set(json.loads(index.read_text())['weight_map'].values()))
             if index.is_file() else ['model.safetensors'])
    state = {}
    for file in files:
      state.update(load_file(folder / file))
    for old, new in _RENAMES.get(config['model_type'], ()):
      state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    model = cls(config).to(dtype or getattr(torch, config.get('dtype', 'float32')))
    model.load_state_dict(state, strict=True)
    return model.eval()

  # -- vision (lavi.LaVi.encode_kind / encode_visual) --------------------------------------------

  def encode_kind(self, visual: VisualInput, video: bool):
    """One kind of visual input -> (tokens (B, F*P, C), mask, item (B, F*P), (F, h, w))."""
    pixels = torch.as_tensor(visual['pixel_values'])
    if not pixels.is_floating_point():  # uint8, normalised as vit.ViT does
      pixels = pixels.float() / 127.5 - 1.0
    b, f = pixels.shape[:2]
    frame_mask = torch.as_tensor(visual.get('frame_mask', torch.ones(b, f, dtype=torch.bool)))
    frame_item = torch.as_tensor(visual.get('frame_item', torch.zeros(b, f, dtype=torch.long)))
    dtype = self.multi_modal_projector.linear_1.weight.dtype
    flat = pixels.reshape(b * f, *pixels.shape[2:]).permute(0, 3, 1, 2).to(dtype)
    hidden = self.vision_tower(pixel_values=flat, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[i] for i in self.lavi.vision.feature_layers], -1)
    if video and self.lavi.vision.video_pool > 1:
      features = pool_grid(features, self.lavi.vision.video_pool)
    tokens = self.multi_modal_projector(features)
    p = tokens.shape[1]
    index = index_within_item(frame_item).clamp(max=self.frame_index.num_embeddings - 1)
    tokens = tokens.reshape(b, f, p, -1) + self.frame_index(index)[:, :, None]
    side = round(p ** 0.5)
    return (tokens.reshape(b, f * p, -1), frame_mask.bool().repeat_interleave(p, 1),
            frame_item.long().repeat_interleave(p, 1), (f, side, side))

  def encode_visual(self, images: VisualInput | None = None, videos: VisualInput | None = None):
    """Images and/or videos -> (tokens (B, N, C), mask, item (B, N), segments) or None."""
    parts = [self.encode_kind(v, video) for v, video in ((images, False), (videos, True))
             if v is not None]
    if not parts:
      return None
    tokens, mask, item, segments = zip(*parts)
    return torch.cat(tokens, 1), torch.cat(mask, 1), torch.cat(item, 1), tuple(segments)

  # -- text (lavi.count_items_so_far, lavi.concat_layout / concat_inputs, llm.LLM) --------------

  def is_placeholder(self, input_ids):
    return (input_ids == self.lavi.image_token_id) | (input_ids == self.lavi.video_token_id)

  def concat_inputs(self, input_ids, text_mask, visual):
    """fusion='concat': each placeholder replaced by its item's valid visual tokens.

    Returns (embeds (B, L, D), valid (B, L) bool, out_pos (B, T): the merged position whose
    logits predict text token t + 1).
    """
    tokens, mask, item, _ = visual
    embeds = self.model.embed_tokens(input_ids)
    rows, valids, out_pos = [], [], torch.zeros(input_ids.shape, dtype=torch.long)
    for b in range(input_ids.shape[0]):
      pieces, valid, items_seen, length = [], [], 0, 0
      for t in range(input_ids.shape[1]):
        if self.is_placeholder(input_ids[b, t]):
          keep = mask[b] & (item[b] == items_seen)
          items_seen += 1
          pieces.append(tokens[b, keep].to(embeds.dtype))
          valid.append(torch.ones(int(keep.sum()), dtype=torch.bool))
        else:
          pieces.append(embeds[b, t:t + 1])
          valid.append(text_mask[b, t:t + 1])
        length += len(valid[-1])
        out_pos[b, t] = length - 1
      rows.append(torch.cat(pieces))
      valids.append(torch.cat(valid))
    return (nn.utils.rnn.pad_sequence(rows, batch_first=True),
            nn.utils.rnn.pad_sequence(valids, batch_first=True), out_pos)

  def hidden_states(self, embeds, positions, valid, cond=None, cache=None):
    """llm.LLM.hidden_states: embeds (B, T, D), positions (B, T), valid (B, S) keys (the cache's
    and the new tokens') -> final-normed hidden (B, T, D); `cache` (DynamicCache) is extended."""
    self.state.cond = cond
    try:
      out = self.model(inputs_embeds=embeds, attention_mask=valid.long(), position_ids=positions,
                       past_key_values=cache, use_cache=cache is not None)
    finally:
      self.state.cond = None
    return out.last_hidden_state

  def logits(self, hidden):
    """llm.LLM.logits: (B, T, D) -> (B, T, V) float32."""
    weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
    return F.linear(hidden, weight).float()

  def visual_memory(self, visual):
    return None if visual is None else self.conditioners.context(*visual)

  def forward(self, input_ids, text_mask=None, images: VisualInput | None = None,
              videos: VisualInput | None = None):
    """input_ids (B, T), text_mask (B, T) (right padding) -> logits (B, T, V) float32; logits at
    t predict text token t + 1 (lavi.LaVi.__call__)."""
    input_ids = torch.as_tensor(input_ids).long()
    b, t = input_ids.shape
    text_mask = (torch.ones(b, t, dtype=torch.bool) if text_mask is None
                 else torch.as_tensor(text_mask).bool())
    visual = self.encode_visual(images, videos)
    if self.lavi.fusion == 'concat' and visual is not None:
      embeds, valid, out_pos = self.concat_inputs(input_ids, text_mask, visual)
      positions = torch.arange(valid.shape[1]).expand(b, -1)
      hidden = self.hidden_states(embeds, positions, valid)
      return self.logits(hidden.gather(1, out_pos[:, :, None].expand(-1, -1, hidden.shape[-1])))
    cond = None
    if self.lavi.fusion == 'viln' and visual is not None:
      items = self.is_placeholder(input_ids).cumsum(1)
      cond = token_conditioning(self.visual_memory(visual), items)
    positions = torch.arange(t).expand(b, -1)
    return self.logits(self.hidden_states(self.model.embed_tokens(input_ids), positions,
                                          text_mask, cond))

  # -- generation (inference.decode.generate) ---------------------------------------------------

  @torch.no_grad()
  def generate(self, input_ids, text_mask=None, images: VisualInput | None = None,
               videos: VisualInput | None = None, *, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_ids=(),
               pad_id: int = 0, generator: torch.Generator | None = None):
    """Up to `max_new_tokens` (N) tokens after each right-padded prompt -> (tokens (B, N), pad
    after each row's end; length (B,), a stop token of `stop_ids` included).

    The prompts are prefilled once into a DynamicCache; LaVi's visual memory is computed there
    and only the per-token conditioning is recomputed at each step (for concat the visual
    tokens sit in the cache). Greedy at temperature 0, else top-k / top-p sampling.
    """
    input_ids = torch.as_tensor(input_ids).long()
    b, t = input_ids.shape
    text_mask = (torch.ones(b, t, dtype=torch.bool) if text_mask is None
                 else torch.as_tensor(text_mask).bool())
    lengths = text_mask.sum(1)
    rows = torch.arange(b)
    visual = self.encode_visual(images, videos)
    cache = transformers.DynamicCache(config=self.model.config)
    memory, cond, items = None, None, torch.zeros(b, dtype=torch.long)
    if self.lavi.fusion == 'concat' and visual is not None:
      embeds, valid, out_pos = self.concat_inputs(input_ids, text_mask, visual)
      last = out_pos[rows, lengths - 1]
    else:
      embeds, valid, last = self.model.embed_tokens(input_ids), text_mask, lengths - 1
      token_items = self.is_placeholder(input_ids).cumsum(1)
      items = token_items[rows, last]
      if self.lavi.fusion == 'viln' and visual is not None:
        memory = self.visual_memory(visual)
        cond = token_conditioning(memory, token_items)
    positions = torch.arange(embeds.shape[1]).expand(b, -1)
    hidden = self.hidden_states(embeds, positions, valid, cond, cache)
    logits = self.logits(hidden[rows, last])
    position = last + 1
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long)
    length = torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    for step in range(max_new_tokens):
      token = sample(logits, temperature, top_k, top_p, generator)
      token = torch.where(done, pad_id, token)
      tokens[:, step] = token
      length += ~done
      done |= torch.isin(token, stops) | (length >= max_new_tokens)
      if done.all():
        break
      items = items + self.is_placeholder(token)
      valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool)], 1)
      cond = None if memory is None else token_conditioning(memory, items[:, None])
      hidden = self.hidden_states(self.model.embed_tokens(token[:, None]), position[:, None],
                                  valid, cond, cache)
      logits = self.logits(hidden[:, 0])
      position = position + 1
    return tokens, length


def sample(logits, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None = None):
  """sampling.sample for one setting: logits (B, V) -> (B,) argmax at temperature 0, else drawn
  after keeping the top_k most likely tokens and the smallest set reaching top_p."""
  if temperature <= 0:
    return logits.argmax(-1)
  scaled = logits.float() / temperature
  ranked, order = scaled.sort(-1, descending=True)
  keep = torch.ones_like(ranked, dtype=torch.bool)
  if top_k > 0:
    keep[:, top_k:] = False
  probs = ranked.masked_fill(~keep, -torch.inf).softmax(-1)
  keep &= (probs.cumsum(-1) - probs) < top_p  # the most likely token is always kept
  ranked = ranked.masked_fill(~keep, -torch.inf)
  choice = torch.multinomial(ranked.softmax(-1), 1, generator=generator)
  return order.gather(1, choice)[:, 0]
