"""LaVi in PyTorch: transformers' Qwen2/LLaMA and SigLIP modules, the LLM's norms wrapped by ViLN.

    model = AutoModelForCausalLM.from_pretrained(EXPORT_DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(EXPORT_DIR, trust_remote_code=True)
    out = model.generate(**processor(text=prompt, images=[image]), max_new_tokens=32)

Shapes: B batch, T text length, F crops/frames, S image side, P visual tokens per frame,
N = F * P visual tokens, C context width (lavi_config.projector.ctx_dim), D LLM width,
V vocabulary. Visual inputs are padded per kind, as the processor gives them:
`pixel_values` (B, F, 3, S, S) float (SigLIP-normalised) with `image_frame_mask` (B, F) bool
and `image_frame_item` (B, F) (the visual item of each crop: its placeholder's rank among the
row's placeholders), and the same for videos (`pixel_values_videos`, `video_frame_mask`,
`video_frame_item`). The numerics follow the JAX model (lavi_jax/models): norm statistics,
softmax and the ViLN deltas in float32; each function names the JAX one it mirrors.

Module names are the export's tensor names: `model` (Qwen2Model / LlamaModel), `lm_head`,
`vision_tower` (SiglipVisionModel), `multi_modal_projector`, `frame_index`, `conditioners`
(`context`, `layers.{l}.{norm}`, `norm`). A ViLN keeps its norm's `weight` where the RMSNorm had
it and uses the conditioner under `conditioners.` without owning it, so the LLM's weights keep
their Qwen2/LLaMA names.

Generation: the visual memory (the conditioners' visual keys/values, or the visual tokens the
mlp/conv conditioners average) is computed once at prefill, returned as `visual_memory` and
passed back at every step; the KV cache (a transformers `Cache`, DynamicCache by default) holds
text tokens only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lavi import LaViConfig

NORM_OF_SUBLAYER = {'attn': 'input_layernorm', 'mlp': 'post_attention_layernorm'}
Memory = dict[str, Any]


def modulated_layers(lavi: dict, num_layers: int) -> list[bool]:
  """config.modulated_layers: per LLM layer, whether its norms are ViLN-modulated."""
  viln = lavi['viln']
  chosen = set(viln['layers']) if viln['layers'] else set(range(0, num_layers, viln['every']))
  return [i in chosen for i in range(num_layers)]


def group_of_layer(layer: int, num_layers: int, kv_groups: int) -> int:
  """config.group_of_layer: contiguous blocks of layers share a conditioner group."""
  return layer * kv_groups // num_layers


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
    self.kind, self.groups = viln['conditioner'], viln['kv_groups']
    self.heads = (viln['heads'], viln['head_dim'])
    width = self.groups * viln['heads'] * viln['head_dim']
    if self.kind == 'attention':
      self.k_proj, self.v_proj = nn.Linear(c, width), nn.Linear(c, width)
    elif self.kind == 'conv':
      self.conv_mixer = nn.ModuleList(ConvMixer(c, viln['conv_kernel'])
                                      for _ in range(self.groups))

  def forward(self, tokens, mask, item, segments) -> Memory:
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


def token_conditioning(memory: Memory, token_items) -> Memory:
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

  def forward(self, x, cond: Memory, group: int):
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

  def __init__(self, lavi: dict, num_layers: int, d: int, c: int):
    super().__init__()
    viln = lavi['viln']
    self.context = ViLNContext(viln, c)
    norms = [NORM_OF_SUBLAYER[s] for s in ('attn', 'mlp') if s in viln['sublayers']]
    self.layers = nn.ModuleDict({
        str(l): nn.ModuleDict({norm: Conditioner(viln, d, c) for norm in norms})
        for l, modulated in enumerate(modulated_layers(lavi, num_layers)) if modulated})
    if 'final' in viln['sublayers']:
      self.norm = Conditioner(viln, d, c)


class ViLNState:
  """The conditioning the ViLN norms read during one LLM call (None: plain RMSNorms)."""
  cond: Memory | None = None


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


@dataclasses.dataclass
class LaViCausalLMOutput(CausalLMOutputWithPast):
  """CausalLMOutputWithPast, and the visual memory (None without visual input) that the next
  decoding step reads instead of the pixels."""
  visual_memory: Memory | None = None


class LaViPreTrainedModel(PreTrainedModel):
  config_class = LaViConfig
  base_model_prefix = ''
  _no_split_modules = ['Qwen2DecoderLayer', 'LlamaDecoderLayer', 'SiglipEncoderLayer']
  _supports_sdpa = True


class LaViForConditionalGeneration(LaViPreTrainedModel, GenerationMixin):
  """lavi.LaVi (fusion='viln') with transformers' generation."""

  _tied_weights_keys = {'lm_head.weight': 'model.embed_tokens.weight'}

  def __init__(self, config: LaViConfig):
    super().__init__(config)
    lavi, text, vision = config.lavi_config, config.text_config, config.vision_config
    d, c = text.hidden_size, lavi['projector']['ctx_dim']
    self.model = AutoModel.from_config(text)
    self.lm_head = nn.Linear(d, text.vocab_size, bias=False)
    self.vision_tower = SiglipVisionModel(vision)
    self.multi_modal_projector = Projector(
        vision.hidden_size * len(lavi['vision']['feature_layers']), c)
    self.frame_index = nn.Embedding(lavi['projector']['max_frames'], c)
    self.conditioners = Conditioners(lavi, text.num_hidden_layers, d, c)
    self.state = ViLNState()
    self._wrap_norms()
    self.post_init()

  def _wrap_norms(self):
    """Replaces the modulated norms of the LLM by ViLNs sharing their weights."""
    n, groups = len(self.model.layers), self.config.lavi_config['viln']['kv_groups']
    for l, layer_conditioners in self.conditioners.layers.items():
      layer = self.model.layers[int(l)]
      for name, conditioner in layer_conditioners.items():
        setattr(layer, name, ViLN(getattr(layer, name), conditioner,
                                  group_of_layer(int(l), n, groups), self.state))
    if hasattr(self.conditioners, 'norm'):
      self.model.norm = ViLN(self.model.norm, self.conditioners.norm,
                             group_of_layer(n - 1, n, groups), self.state)

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def get_output_embeddings(self):
    return self.lm_head

  # -- vision (lavi.LaVi.encode_kind / encode_visual) --------------------------------------------

  def encode_kind(self, pixels, frame_mask, frame_item, video: bool):
    """pixels (B, F, 3, S, S), frame_mask/frame_item (B, F) (None: all valid / item 0) ->
    (tokens (B, F*P, C), mask, item (B, F*P), (F, h, w)). Only valid frames reach the ViT."""
    b, f = pixels.shape[:2]
    device = pixels.device
    frame_mask = (torch.ones(b, f, dtype=torch.bool, device=device) if frame_mask is None
                  else frame_mask.bool())
    frame_item = (torch.zeros(b, f, dtype=torch.long, device=device) if frame_item is None
                  else frame_item.long())
    lavi = self.config.lavi_config['vision']
    valid = frame_mask.reshape(-1)
    flat = pixels.reshape(b * f, *pixels.shape[2:])[valid].to(self.vision_tower.dtype)
    hidden = self.vision_tower(pixel_values=flat, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[i] for i in lavi['feature_layers']], -1)
    if video and lavi['video_pool'] > 1:
      features = pool_grid(features, lavi['video_pool'])
    projected = self.multi_modal_projector(features)
    tokens = projected.new_zeros(b * f, *projected.shape[1:])
    tokens[valid] = projected
    p = tokens.shape[1]
    index = index_within_item(frame_item).clamp(max=self.frame_index.num_embeddings - 1)
    tokens = tokens.reshape(b, f, p, -1) + self.frame_index(index)[:, :, None]
    side = round(p ** 0.5)
    return (tokens.reshape(b, f * p, -1), frame_mask.repeat_interleave(p, 1),
            frame_item.repeat_interleave(p, 1), (f, side, side))

  def visual_memory(self, pixel_values=None, image_frame_mask=None, image_frame_item=None,
                    pixel_values_videos=None, video_frame_mask=None,
                    video_frame_item=None) -> Memory | None:
    """Images and/or videos -> the conditioners' memory (ViLNContext), None without either."""
    parts = [self.encode_kind(*kind) for kind in (
        (pixel_values, image_frame_mask, image_frame_item, False),
        (pixel_values_videos, video_frame_mask, video_frame_item, True)) if kind[0] is not None]
    if not parts:
      return None
    tokens, mask, item, segments = zip(*parts)
    return self.conditioners.context(torch.cat(tokens, 1), torch.cat(mask, 1),
                                     torch.cat(item, 1), tuple(segments))

  # -- text (lavi.count_items_so_far, llm.LLM) ---------------------------------------------------

  def token_items(self, input_ids):
    """lavi.count_items_so_far: (B, T) ids -> (B, T) placeholders at or before each token."""
    config = self.config
    return ((input_ids == config.image_token_id) | (input_ids == config.video_token_id)).cumsum(1)

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
              pixel_values=None, image_frame_mask=None, image_frame_item=None,
              pixel_values_videos=None, video_frame_mask=None, video_frame_item=None,
              visual_memory: Memory | None = None, token_items=None, use_cache=None,
              logits_to_keep: int = 0, **kwargs) -> LaViCausalLMOutput:
    """input_ids (B, T) -> logits (B, T, V) float32 (the last `logits_to_keep` positions when
    > 0); logits at t predict token t + 1 (lavi.LaVi.__call__).

    visual_memory: from an earlier call's output (then the pixels are not read again);
    token_items (B, T): visual items seen up to each token (default: counted in input_ids,
    which then must start at the first token; generation passes them).
    """
    if visual_memory is None:
      visual_memory = self.visual_memory(pixel_values, image_frame_mask, image_frame_item,
                                         pixel_values_videos, video_frame_mask,
                                         video_frame_item)
    if token_items is None:
      token_items = self.token_items(input_ids)
    self.state.cond = (None if visual_memory is None
                       else token_conditioning(visual_memory, token_items))
    try:
      out = self.model(input_ids, attention_mask, position_ids, cache, use_cache=use_cache,
                       **kwargs)
    finally:
      self.state.cond = None
    hidden = out.last_hidden_state[:, -logits_to_keep:]
    return LaViCausalLMOutput(logits=self.lm_head(hidden).float(), cache=out.cache,
                              visual_memory=visual_memory)

  # -- generation (inference.decode.generate) ---------------------------------------------------

  def prepare_inputs_for_generation(self, input_ids, **kwargs):
    """GenerationMixin's inputs, and each new token's visual items counted over the whole
    sequence (prompt and tokens so far)."""
    inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
    inputs['token_items'] = self.token_items(input_ids)[:, -inputs['input_ids'].shape[1]:]
    return inputs

  def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
    """Keeps the prefill's visual memory for the decoding steps."""
    model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args,
                                                               **kwargs)
    model_kwargs['visual_memory'] = outputs.visual_memory
    return model_kwargs
