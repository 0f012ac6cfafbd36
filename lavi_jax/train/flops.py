"""Analytic FLOPs of a LaVi forward pass and peak device FLOP/s, for MFU.

Convention: a matmul of (m, k) by (k, n) is 2mkn FLOPs; causal self-attention counts half of
the score and value products; the training step counts 3x the forward (forward, activation
gradients, weight gradients) except for a frozen ViT, which runs forward only, and a frozen LLM,
which runs forward and activation gradients (its conditioners train inside it).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from lavi_jax import config as lavi_config
from lavi_jax.models.vit import resolve_feature_layers

# Dense bf16 peak FLOP/s per device, matched against `device.device_kind`.
PEAK_FLOPS = (
    ('TPU v6', 918e12), ('TPU v5p', 459e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12),
    ('TPU v5', 459e12), ('TPU v4', 275e12), ('TPU v3', 123e12), ('H200', 989e12),
    ('H100', 989e12), ('A100', 312e12), ('L4', 121e12),
)


def peak_flops_per_device(device: jax.Device | None = None, configured: float = 0.0):
  """Configured value, else the table entry for the device kind, else None (e.g. CPU)."""
  if configured:
    return configured
  kind = (device or jax.devices()[0]).device_kind
  return next((flops for name, flops in PEAK_FLOPS if name.lower() in kind.lower()), None)


@dataclasses.dataclass
class ForwardFlops:
  vision: float
  projector: float
  conditioners: float
  llm: float

  @property
  def total(self) -> float:
    return self.vision + self.projector + self.conditioners + self.llm


def _decoder_flops(llm: ml_collections.ConfigDict, tokens: int, batch: int) -> float:
  d, hd = llm.hidden_size, lavi_config.head_dim(llm)
  attn_width = llm.num_heads * hd
  proj = d * attn_width * 2 + d * llm.num_kv_heads * hd * 2
  mlp = 3 * d * llm.intermediate_size
  per_token = 2 * llm.num_layers * (proj + mlp) + 2 * d * llm.vocab_size
  attention = 2 * llm.num_layers * attn_width * tokens * tokens  # causal: half of 4*T^2*width
  return batch * (per_token * tokens + attention)


def forward_flops(model: ml_collections.ConfigDict, batch: int, text_len: int,
                  image_frames: int = 0, video_frames: int = 0, *,
                  vit_passes: float | None = None,
                  visual_tokens: float | None = None) -> ForwardFlops:
  """FLOPs of one forward pass on (batch, text_len) text plus, per row, `image_frames` image
  crops and `video_frames` video frames. A frame-pool batch gives its real work instead:
  `vit_passes` crops and frames encoded in all, `visual_tokens` per row on average."""
  vis, llm, viln = model.vision, model.llm, model.viln
  patches = (vis.image_size // vis.patch_size) ** 2
  layers_run = max(resolve_feature_layers(vis))
  dv = vis.hidden_size
  vit_layer = 2 * patches * (4 * dv * dv + 2 * dv * vis.intermediate_size) + 4 * patches ** 2 * dv
  per_frame = layers_run * vit_layer + 2 * patches * vis.patch_size ** 2 * 3 * dv
  frames = batch * (image_frames + video_frames) if vit_passes is None else vit_passes
  video_tokens = lavi_config.num_visual_tokens_per_frame(vis, video=True)
  n_visual = image_frames * patches + video_frames * video_tokens  # per sample
  if visual_tokens is not None:
    n_visual = visual_tokens
  c = lavi_config.ctx_dim(model)
  d_in = dv * len(vis.feature_layers)
  projector = 2 * batch * n_visual * (d_in * c + c * c)
  if model.fusion == 'concat':
    return ForwardFlops(frames * per_frame, projector, 0.0,
                        _decoder_flops(llm, text_len + n_visual, batch))
  norms = lavi_config.num_modulated_norms(model)
  d = llm.hidden_size
  if viln.conditioner == 'attention':
    width = viln.heads * viln.head_dim
    per_norm = 2 * (d * width + width * 2 * d) + 4 * n_visual * width
    context = 2 * n_visual * c * 2 * width * viln.kv_groups
  else:
    per_norm = 2 * ((d + c) * viln.mlp_dim + viln.mlp_dim * 2 * d)
    groups = viln.kv_groups if viln.conditioner == 'conv' else 1
    mixer = 2 * n_visual * c * (c + viln.conv_kernel ** 2) if viln.conditioner == 'conv' else 0
    context = groups * (mixer + 2 * text_len * n_visual * c)
  conditioners = batch * (norms * per_norm * text_len + context)
  return ForwardFlops(frames * per_frame, projector, conditioners,
                      _decoder_flops(llm, text_len, batch))


def train_step_flops(forward: ForwardFlops, vit_trained: bool, llm_trained: bool = True) -> float:
  """FLOPs of one training step given the forward FLOPs of its global batch: 3x the forward,
  except that a frozen ViT runs forward only and a frozen LLM (its conditioners training) needs
  activation gradients but no weight gradients: 2x."""
  vision = forward.vision * (3 if vit_trained else 1)
  return vision + 3 * (forward.projector + forward.conditioners) + (
      3 if llm_trained else 2) * forward.llm


def recomputed_forward_flops(model: ml_collections.ConfigDict, vit_trained: bool,
                             **dims) -> float | None:
  """Forward FLOPs that rematerialisation runs again in the backward pass of a train step
  (`dims`: the arguments of `forward_flops` after the model).

  remat='full' recomputes every differentiated layer: the LLM decoder layers with their
  conditioners (everything but the embedding, the LM head and the visual context) and, when the
  ViT trains, the vision tower (its patch embedding included); 'none' recomputes nothing. The
  selective policies keep some products, so what they recompute is XLA's choice: None.
  """
  if model.remat == 'none':
    return 0.0
  if model.remat != 'full':
    return None
  without_layers = model.copy_and_resolve_references()
  without_layers.llm.num_layers = 0
  full, outside = forward_flops(model, **dims), forward_flops(without_layers, **dims)
  layers = full.llm + full.conditioners - outside.llm - outside.conditioners
  return layers + (full.vision if vit_trained else 0.0)
