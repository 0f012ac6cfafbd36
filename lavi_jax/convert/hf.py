"""Hugging Face checkpoint import: Qwen2 / LLaMA LLMs, SigLIP vision towers, LLaVA(-OneVision),
and `convert.to_torch` exports (`load_hf_lavi`).

Shapes: V vocabulary, D width, F MLP width, H heads, K kv heads, Dh head width, p patch side,
P patches per image, Dv ViT width, C projector width.

The name mapping is one table per part (`llm_tensor_map`, `vision_tensor_map`,
`projector_tensor_map`, `frame_index_entry`, `conditioner_tensor_map`; all of a model's:
`export_tensor_map`): `Entry(hf_name, path, index, hf_shape, shape, kind)` says that HF tensor
`hf_name` of shape `hf_shape` becomes the LaVi parameter at `path` (from the root of LaVi's tree;
at `index` of its leading stacked axis for scanned layers) of shape `shape`, by `to_flax(kind)`;
`to_hf(kind)` is the inverse, for export (`convert.to_torch`).

Tensors are read one at a time from memory-mapped safetensors files (any dtype, bf16 included)
into preallocated arrays, so peak host memory is about the size of the model. Every tensor of
the checkpoint must be mapped or listed as known-unused; anything missing, left over or of the
wrong shape is an error that names it.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from lavi_jax import config as lavi_config
from lavi_jax import paths
from lavi_jax.models.lavi import init_params
from lavi_jax.models.llm import layer_param_path

Params = dict[str, Any]


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the tensor or config key."""


# ---------------------------------------------------------------------------------------------
# Reading safetensors checkpoints.

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


class Checkpoint:
  """The tensors of a HF checkpoint folder (`model.safetensors`, or shards listed in
  `model.safetensors.index.json`), memory-mapped; `read` returns a view without copying. The
  folder must be local (memory-mapping needs a local file)."""

  def __init__(self, path: str | pathlib.Path):
    if paths.is_url(path):
      raise ConversionError(f'{path}: safetensors checkpoints are read from a local folder; copy '
                            'it to a local disk first (e.g. gcloud storage cp -r)')
    folder = pathlib.Path(path)
    index = folder / 'model.safetensors.index.json'
    if index.is_file():
      files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    elif (folder / 'model.safetensors').is_file():
      files = ['model.safetensors']
    else:
      raise ConversionError(f'{folder}: no model.safetensors or model.safetensors.index.json')
    self.path = folder
    self._tensors: dict[str, tuple[np.ndarray, np.dtype, tuple[int, ...]]] = {}
    for file in files:
      self._open(folder / file)

  def _open(self, file: pathlib.Path):
    data = np.memmap(file, dtype=np.uint8, mode='r')
    header_len = int(data[:8].view('<u8')[0])
    header = json.loads(bytes(data[8:8 + header_len]))
    header.pop('__metadata__', None)
    base = 8 + header_len
    for name, info in header.items():
      if info['dtype'] not in _SAFETENSORS_DTYPES:
        raise ConversionError(f'{file}: tensor {name} has unsupported dtype {info["dtype"]}')
      if name in self._tensors:
        raise ConversionError(f'{file}: tensor {name} is stored twice')
      start, end = info['data_offsets']
      self._tensors[name] = (data[base + start:base + end],
                             np.dtype(_SAFETENSORS_DTYPES[info['dtype']]), tuple(info['shape']))

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._tensors[name][2]

  def read(self, name: str) -> np.ndarray:
    raw, dtype, shape = self._tensors[name]
    return raw.view(dtype).reshape(shape)


def read_hf_config(path: str | epath.PathLike) -> dict[str, Any]:
  file = epath.Path(path) / 'config.json'
  if not file.is_file():
    raise ConversionError(f'{path}: no config.json')
  return json.loads(file.read_text())


# ---------------------------------------------------------------------------------------------
# HF configs -> LaVi config sections.

# Hugging Face defaults of the fields read here (configs saved as diffs omit them).
_LLM_DEFAULTS = {
    'qwen2': dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    'llama': dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None),
}
_LLM_COMMON_DEFAULTS = dict(hidden_act='silu', rms_norm_eps=1e-6, rope_theta=10000.0,
                            attention_bias=False, mlp_bias=False, use_sliding_window=False,
                            head_dim=None, tie_word_embeddings=False)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)


def _with_defaults(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  return {**defaults, **{k: v for k, v in hf.items() if v is not None}}


def _unsupported(what: str, message: str):
  raise ConversionError(f'unsupported {what}: {message}')


def llm_section(hf: dict[str, Any], tie_word_embeddings: bool | None = None) -> dict[str, Any]:
  """A Qwen2/LLaMA HF config (dict) -> LaVi `model.llm` fields."""
  arch = hf.get('model_type')
  if arch not in _LLM_DEFAULTS:
    _unsupported('LLM architecture', f'model_type={arch!r} (supported: {sorted(_LLM_DEFAULTS)})')
  c = _with_defaults(hf, {**_LLM_COMMON_DEFAULTS, **_LLM_DEFAULTS[arch]})
  if c['hidden_act'] != 'silu':
    _unsupported('LLM option', f'hidden_act={c["hidden_act"]!r} (SwiGLU needs silu)')
  if c['mlp_bias']:
    _unsupported('LLM option', 'mlp_bias=True (the MLP has no biases)')
  if arch == 'llama' and c['attention_bias']:
    _unsupported('LLM option', 'attention_bias=True (LLaMA then also has an o_proj bias, which '
                 'the model does not have)')
  if c['use_sliding_window'] or any(t != 'full_attention' for t in c.get('layer_types', ())):
    _unsupported('LLM option', 'sliding-window attention (use_sliding_window / layer_types)')
  rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    _unsupported('LLM option', f'rope_scaling of type {rope_type!r} (only default RoPE)')
  if rope.get('partial_rotary_factor', c.get('partial_rotary_factor', 1.0)) != 1.0:
    _unsupported('LLM option', 'partial_rotary_factor != 1')
  heads = c['num_attention_heads']
  return dict(
      arch=arch, vocab_size=c['vocab_size'], hidden_size=c['hidden_size'],
      intermediate_size=c['intermediate_size'], num_layers=c['num_hidden_layers'],
      num_heads=heads, num_kv_heads=c['num_key_value_heads'] or heads,
      head_dim=c['head_dim'] or c['hidden_size'] // heads,
      rope_theta=float(rope.get('rope_theta', c['rope_theta'])),
      rms_norm_eps=float(c['rms_norm_eps']), qkv_bias=arch == 'qwen2',
      tie_word_embeddings=bool(c['tie_word_embeddings'] if tie_word_embeddings is None
                               else tie_word_embeddings))


def _square(value, key: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      _unsupported('vision option', f'non-square {key}={value}')
    value = value[0]
  return int(value)


def vision_section(hf: dict[str, Any]) -> dict[str, Any]:
  """A SigLIP vision HF config (dict) -> LaVi `model.vision` fields (feature_layers excluded)."""
  if hf.get('model_type') != 'siglip_vision_model':
    _unsupported('vision tower', f'model_type={hf.get("model_type")!r} (supported: '
                 'siglip_vision_model)')
  c = _with_defaults(hf, _VISION_DEFAULTS)
  if c['hidden_act'] != 'gelu_pytorch_tanh':
    _unsupported('vision option', f'hidden_act={c["hidden_act"]!r} (SigLIP uses '
                 'gelu_pytorch_tanh)')
  if c['num_channels'] != 3:
    _unsupported('vision option', f'num_channels={c["num_channels"]} (RGB only)')
  return dict(image_size=_square(c['image_size'], 'image_size'),
              patch_size=_square(c['patch_size'], 'patch_size'), hidden_size=c['hidden_size'],
              intermediate_size=c['intermediate_size'], num_layers=c['num_hidden_layers'],
              num_heads=c['num_attention_heads'], layer_norm_eps=float(c['layer_norm_eps']))


def hf_text_config(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """`model.llm` as a Qwen2Config / LlamaConfig dict (the inverse of `llm_section`)."""
  llm = model.llm
  if llm.qkv_bias != (llm.arch == 'qwen2'):
    _unsupported('LLM option', f'model.llm.qkv_bias={llm.qkv_bias} with arch={llm.arch!r} '
                 '(Qwen2 has QKV biases, LLaMA none)')
  out = dict(model_type=llm.arch, vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
             intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
             num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
             head_dim=lavi_config.head_dim(llm), hidden_act='silu',
             rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
             rope_parameters=dict(rope_type='default', rope_theta=llm.rope_theta),
             tie_word_embeddings=llm.tie_word_embeddings, max_position_embeddings=32768)
  if llm.arch == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  return out


def hf_vision_config(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """`model.vision` as a SiglipVisionConfig dict (the inverse of `vision_section`; no pooling
  head)."""
  vis = model.vision
  return dict(model_type='siglip_vision_model', hidden_size=vis.hidden_size,
              intermediate_size=vis.intermediate_size, num_hidden_layers=vis.num_layers,
              num_attention_heads=vis.num_heads, image_size=vis.image_size,
              patch_size=vis.patch_size, layer_norm_eps=vis.layer_norm_eps,
              hidden_act='gelu_pytorch_tanh', num_channels=3, vision_use_head=False)


def _updated(model_config: ml_collections.ConfigDict | None,
             **sections) -> ml_collections.ConfigDict:
  """A copy of `model_config` (default: base_model_config()) with sections updated."""
  model = (lavi_config.base_model_config() if model_config is None
           else model_config.copy_and_resolve_references())
  for name, fields in sections.items():
    if isinstance(fields, dict):
      model[name].update(fields)
    else:
      model[name] = fields
  return model


# ---------------------------------------------------------------------------------------------
# The mapping table.

class Entry(NamedTuple):
  """HF tensor `hf_name` (hf_shape) <-> LaVi parameter `path` (shape), at `index` of the leading
  stacked axis (None: not stacked), converted by `kind` ('copy', 'linear' or 'conv')."""
  hf_name: str
  path: tuple[str, ...]
  index: int | None
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  kind: str


def to_flax(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """HF tensor -> LaVi parameter. 'linear': torch (out, in) -> kernel (in..., out...);
  'conv': torch (D, I, p, p) -> (p, p, I, D) (depthwise, I = 1: (p, p, D)); 'copy': reshape only
  (biases -> (H, Dh))."""
  if kind == 'linear':
    x = x.T
  elif kind == 'conv':
    x = x.transpose(2, 3, 1, 0)
  return x.reshape(shape)


def to_hf(kind: str, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `to_flax`."""
  if kind == 'linear':
    return x.reshape(hf_shape[::-1]).T
  if kind == 'conv':
    return x.reshape(hf_shape[2:] + hf_shape[1::-1]).transpose(3, 2, 0, 1)
  return x.reshape(hf_shape)


def llm_tensor_map(model: ml_collections.ConfigDict, body: str = 'model.',
                   head: str = 'lm_head.weight') -> list[Entry]:
  """Entries of the LLM (`body`: prefix of `embed_tokens`, `layers`, `norm`; `head`: lm_head)."""
  llm = model.llm
  v, d, f = llm.vocab_size, llm.hidden_size, llm.intermediate_size
  h, k, hd = llm.num_heads, llm.num_kv_heads, lavi_config.head_dim(llm)
  # Per layer: (HF name, path within the layer, HF shape, LaVi shape, kind).
  spec = []
  for proj, heads in (('q', h), ('k', k), ('v', k)):
    spec.append((f'self_attn.{proj}_proj.weight', ('self_attn', f'{proj}_proj', 'kernel'),
                 (heads * hd, d), (d, heads, hd), 'linear'))
    if llm.qkv_bias:
      spec.append((f'self_attn.{proj}_proj.bias', ('self_attn', f'{proj}_proj', 'bias'),
                   (heads * hd,), (heads, hd), 'copy'))
  spec.append(('self_attn.o_proj.weight', ('self_attn', 'o_proj', 'kernel'), (d, h * hd),
               (h, hd, d), 'linear'))
  for proj, hf_shape in (('gate', (f, d)), ('up', (f, d)), ('down', (d, f))):
    spec.append((f'mlp.{proj}_proj.weight', ('mlp', f'{proj}_proj', 'kernel'), hf_shape,
                 hf_shape[::-1], 'linear'))
  for norm in lavi_config.NORM_OF_SUBLAYER.values():
    spec.append((f'{norm}.weight', (norm, 'scale'), (d,), (d,), 'copy'))
  entries = [Entry(f'{body}embed_tokens.weight', ('llm', 'embed_tokens', 'embedding'), None,
                   (v, d), (v, d), 'copy')]
  for layer in range(llm.num_layers):
    where, index = layer_param_path(model, layer)
    entries += [Entry(f'{body}layers.{layer}.{name}', ('llm',) + where + path, index, hf_shape,
                      shape, kind) for name, path, hf_shape, shape, kind in spec]
  entries.append(Entry(f'{body}norm.weight', ('llm', 'norm', 'scale'), None, (d,), (d,), 'copy'))
  if not llm.tie_word_embeddings:
    entries.append(Entry(head, ('llm', 'lm_head', 'kernel'), None, (v, d), (d, v), 'linear'))
  return entries


def vision_tensor_map(model: ml_collections.ConfigDict, prefix: str = '') -> list[Entry]:
  """Entries of the SigLIP vision tower (`prefix`: of `embeddings`, `encoder`, `post_layernorm`)."""
  vis = model.vision
  d, m, p, h = vis.hidden_size, vis.intermediate_size, vis.patch_size, vis.num_heads
  hd, num_patches = d // h, (vis.image_size // p) ** 2
  entries = [
      Entry(f'{prefix}embeddings.patch_embedding.weight', ('vit', 'patch_embedding', 'kernel'),
            None, (d, 3, p, p), (p, p, 3, d), 'conv'),
      Entry(f'{prefix}embeddings.patch_embedding.bias', ('vit', 'patch_embedding', 'bias'),
            None, (d,), (d,), 'copy'),
      Entry(f'{prefix}embeddings.position_embedding.weight', ('vit', 'position_embedding'), None,
            (num_patches, d), (num_patches, d), 'copy'),
  ]

  def norm(hf_name, path):
    entries.extend([Entry(f'{hf_name}.weight', path + ('scale',), None, (d,), (d,), 'copy'),
                    Entry(f'{hf_name}.bias', path + ('bias',), None, (d,), (d,), 'copy')])

  for i in range(vis.num_layers):
    hf, path = f'{prefix}encoder.layers.{i}.', ('vit', f'layers_{i}')
    norm(f'{hf}layer_norm1', path + ('layer_norm1',))
    for proj in ('q_proj', 'k_proj', 'v_proj'):
      entries += [Entry(f'{hf}self_attn.{proj}.weight', path + ('self_attn', proj, 'kernel'), None,
                        (d, d), (d, h, hd), 'linear'),
                  Entry(f'{hf}self_attn.{proj}.bias', path + ('self_attn', proj, 'bias'), None,
                        (d,), (h, hd), 'copy')]
    entries += [Entry(f'{hf}self_attn.out_proj.weight', path + ('self_attn', 'out_proj', 'kernel'),
                      None, (d, d), (h, hd, d), 'linear'),
                Entry(f'{hf}self_attn.out_proj.bias', path + ('self_attn', 'out_proj', 'bias'),
                      None, (d,), (d,), 'copy')]
    norm(f'{hf}layer_norm2', path + ('layer_norm2',))
    for fc, (n_out, n_in) in (('fc1', (m, d)), ('fc2', (d, m))):
      entries += [Entry(f'{hf}mlp.{fc}.weight', path + ('mlp', fc, 'kernel'), None, (n_out, n_in),
                        (n_in, n_out), 'linear'),
                  Entry(f'{hf}mlp.{fc}.bias', path + ('mlp', fc, 'bias'), None, (n_out,),
                        (n_out,), 'copy')]
  norm(f'{prefix}post_layernorm', ('vit', 'post_layernorm'))
  return entries


def projector_tensor_map(model: ml_collections.ConfigDict,
                         prefix: str = 'multi_modal_projector.') -> list[Entry]:
  """Entries of the LLaVA projector: linear_1 (C, Dv * len(feature_layers)), linear_2 (C, C)."""
  c = lavi_config.ctx_dim(model)
  dv = model.vision.hidden_size * len(model.vision.feature_layers)
  entries = []
  for name, n_in in (('linear_1', dv), ('linear_2', c)):
    entries += [Entry(f'{prefix}{name}.weight', ('projector', name, 'kernel'), None, (c, n_in),
                      (n_in, c), 'linear'),
                Entry(f'{prefix}{name}.bias', ('projector', name, 'bias'), None, (c,), (c,),
                      'copy')]
  return entries


def frame_index_entry(model: ml_collections.ConfigDict, name: str = 'frame_index.weight') -> Entry:
  """The crop/frame-index embedding (max_frames, C), as an nn.Embedding weight."""
  shape = (model.projector.max_frames, lavi_config.ctx_dim(model))
  return Entry(name, ('frame_index', 'embedding'), None, shape, shape, 'copy')


def conditioner_tensor_map(model: ml_collections.ConfigDict,
                           prefix: str = 'conditioners.') -> list[Entry]:
  """Entries of the ViLN conditioners (fusion='viln'); G groups, Hc x Dc heads, F = mlp_dim.

  `{prefix}context.`: the visual memory, attention `k_proj`/`v_proj` (G*Hc*Dc, C); conv
  `conv_mixer.{g}.` (`depthwise` (C, 1, k, k), `norm1`, `pointwise` (C, C), `norm2`). One
  conditioner per modulated norm under `{prefix}layers.{l}.{input,post_attention}_layernorm.` and
  `{prefix}norm.`: attention `q_proj` (Hc*Dc, D), `o_proj` (2D, Hc*Dc); mlp/conv `fc1`
  (F, D + C), `fc2` (2D, F); with a tanh gate the scalar `gate`. Rows of o_proj/fc2: dg, then db.
  """
  viln, d, c = model.viln, model.llm.hidden_size, lavi_config.ctx_dim(model)
  g, heads = viln.kv_groups, (viln.heads, viln.head_dim)
  hc = viln.heads * viln.head_dim
  context, entries = f'{prefix}context.', []
  if viln.conditioner == 'attention':
    for proj in ('k_proj', 'v_proj'):
      path = ('viln_context', proj)
      entries += [Entry(f'{context}{proj}.weight', path + ('kernel',), None, (g * hc, c),
                        (c, g) + heads, 'linear'),
                  Entry(f'{context}{proj}.bias', path + ('bias',), None, (g * hc,),
                        (g,) + heads, 'copy')]
  elif viln.conditioner == 'conv':
    k, path = viln.conv_kernel, ('viln_context', 'conv_mixer')
    for group in range(g):
      hf = f'{context}conv_mixer.{group}.'
      entries += [Entry(f'{hf}depthwise.weight', path + ('depthwise_kernel',), group,
                        (c, 1, k, k), (k, k, c), 'conv'),
                  Entry(f'{hf}depthwise.bias', path + ('depthwise_bias',), group, (c,), (c,),
                        'copy'),
                  Entry(f'{hf}pointwise.weight', path + ('pointwise', 'kernel'), group, (c, c),
                        (c, c), 'linear'),
                  Entry(f'{hf}pointwise.bias', path + ('pointwise', 'bias'), group, (c,), (c,),
                        'copy')]
      for norm in ('norm1', 'norm2'):
        entries += [Entry(f'{hf}{norm}.weight', path + (norm, 'scale'), group, (c,), (c,), 'copy'),
                    Entry(f'{hf}{norm}.bias', path + (norm, 'bias'), group, (c,), (c,), 'copy')]
  # Per modulated norm: (HF name, path within the conditioner, HF shape, LaVi shape, kind).
  if viln.conditioner == 'attention':
    spec = [('q_proj.weight', ('q_proj', 'kernel'), (hc, d), (d,) + heads, 'linear'),
            ('o_proj.weight', ('o_proj', 'kernel'), (2 * d, hc), heads + (2, d), 'linear'),
            ('o_proj.bias', ('o_proj', 'bias'), (2 * d,), (2, d), 'copy')]
  else:
    f = viln.mlp_dim
    spec = [('fc1.weight', ('fc1', 'kernel'), (f, d + c), (d + c, f), 'linear'),
            ('fc1.bias', ('fc1', 'bias'), (f,), (f,), 'copy'),
            ('fc2.weight', ('fc2', 'kernel'), (2 * d, f), (f, 2, d), 'linear'),
            ('fc2.bias', ('fc2', 'bias'), (2 * d,), (2, d), 'copy')]
  if viln.gate == 'tanh':
    spec.append(('gate', ('gate',), (), (), 'copy'))
  norms = []  # (HF name, path of the ViLN, index)
  for layer, modulated in enumerate(lavi_config.modulated_layers(model)):
    where, index = layer_param_path(model, layer)
    norms += [(f'layers.{layer}.{lavi_config.NORM_OF_SUBLAYER[s]}.', ('llm',) + where +
               (lavi_config.NORM_OF_SUBLAYER[s],), index)
              for s in ('attn', 'mlp') if modulated and s in viln.sublayers]
  if 'final' in viln.sublayers:
    norms.append(('norm.', ('llm', 'norm'), None))
  for hf, path, index in norms:
    entries += [Entry(f'{prefix}{hf}{name}', path + ('conditioner',) + sub, index, hf_shape,
                      shape, kind) for name, sub, hf_shape, shape, kind in spec]
  return entries


# Tensor-name layouts of `convert.to_torch` exports: (LLM body, lm_head, vision tower, projector).
# LaVi: the LLM exactly as in Qwen2ForCausalLM / LlamaForCausalLM; LLaVA (fusion='concat'): as
# transformers saves LlavaForConditionalGeneration. Both add `frame_index.weight`; LaVi adds the
# conditioners under `conditioners.`.
EXPORT_LAYOUTS = {
    'viln': ('model.', 'lm_head.weight', 'vision_tower.', 'multi_modal_projector.'),
    'concat': ('language_model.model.', 'language_model.lm_head.weight', 'vision_tower.',
               'multi_modal_projector.'),
}


def export_tensor_map(model: ml_collections.ConfigDict) -> list[Entry]:
  """Every parameter of `LaVi(model)`, named as in a `convert.to_torch` export."""
  body, head, vision, projector = EXPORT_LAYOUTS[model.fusion]
  entries = (llm_tensor_map(model, body, head) + vision_tensor_map(model, vision) +
             projector_tensor_map(model, projector) + [frame_index_entry(model)])
  if model.fusion == 'viln':
    entries += conditioner_tensor_map(model)
  return entries


# ---------------------------------------------------------------------------------------------
# Loading.

Unused = list[tuple[str, str]]  # (regex over HF names, why the tensors are not used)


def _format_names(names: list[str], limit: int = 20) -> str:
  more = f' ... and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def read_params(checkpoint: Checkpoint, entries: list[Entry], unused: Unused,
                dtype: str | np.dtype | None = None) -> Params:
  """Reads the tensors of `entries` into a nested dict of numpy arrays (LaVi layout).

  Checks first, from the headers only, that no tensor is missing, left over (neither mapped nor
  matching an `unused` pattern) or of the wrong shape. `dtype`: cast to it (default: as stored).
  """
  names = checkpoint.names()
  where = checkpoint.path
  missing = [e.hf_name for e in entries if e.hf_name not in names]
  if missing:
    raise ConversionError(f'{where}: missing tensors: {_format_names(missing)}')
  skipped = {why: [] for _, why in unused}
  leftover = []
  for name in sorted(names - {e.hf_name for e in entries}):
    why = next((why for pattern, why in unused if re.fullmatch(pattern, name)), None)
    (leftover if why is None else skipped[why]).append(name)
  if leftover:
    raise ConversionError(f'{where}: unexpected tensors (neither mapped nor known-unused): '
                          f'{_format_names(leftover)}')
  wrong = [f'{e.hf_name} (expected {e.hf_shape}, got {checkpoint.shape(e.hf_name)})'
           for e in entries if checkpoint.shape(e.hf_name) != e.hf_shape]
  if wrong:
    raise ConversionError(f'{where}: tensors of the wrong shape: {_format_names(wrong)}')
  for why, skipped_names in skipped.items():
    if skipped_names:
      logging.info('%s: not used: %s: %s', where, why, _format_names(skipped_names, 5))
  stacked = {}
  for e in entries:
    if e.index is not None:
      stacked[e.path] = max(stacked.get(e.path, 0), e.index + 1)
  out: dict[tuple[str, ...], np.ndarray] = {}
  for e in entries:
    x = to_flax(e.kind, checkpoint.read(e.hf_name), e.shape)
    target = np.dtype(dtype) if dtype is not None else x.dtype
    if e.index is None:
      out[e.path] = np.array(x, dtype=target)
    else:
      if e.path not in out:
        out[e.path] = np.empty((stacked[e.path],) + e.shape, target)
      out[e.path][e.index] = x
  return traverse_util.unflatten_dict(out)


def _llm_unused(body: str, head: str, tied: bool) -> Unused:
  unused = [(re.escape(body) + r'layers\.\d+\.self_attn\.rotary_emb\.inv_freq',
             'RoPE frequencies (a buffer in old LLaMA checkpoints), recomputed')]
  if tied:
    unused.append((re.escape(head), 'lm_head, tied to embed_tokens (tie_word_embeddings=True)'))
  return unused


def _vision_unused(prefix: str) -> Unused:
  return [(re.escape(prefix) + r'head\..*', 'SigLIP attention-pooling head; LaVi uses the patch '
           'features'),
          (re.escape(prefix) + r'embeddings\.position_ids', 'position index buffer')]


def _find_prefix(names: set[str], candidates, suffix: str, what: str) -> str:
  for prefix in candidates:
    if prefix + suffix in names:
      return prefix
  raise ConversionError(f'no {what} found: none of {[p + suffix for p in candidates]} is in the '
                        'checkpoint')


def load_hf_llm(path: str | pathlib.Path, model_config: ml_collections.ConfigDict | None = None,
                dtype: str | np.dtype | None = None) -> tuple[ml_collections.ConfigDict, Params]:
  """A Qwen2ForCausalLM / LlamaForCausalLM folder -> (model config, `llm` params).

  The model config is `model_config` (default: base_model_config()) with `llm` from the HF
  config; the params are laid out for it (scanned or not: `scan_layers`, ViLN pattern). They
  hold no conditioner parameters: merge them into a LaVi tree with `init_with_imported`.
  """
  hf = read_hf_config(path)
  model = _updated(model_config, llm=llm_section(hf))
  body, head = 'model.', 'lm_head.weight'
  params = read_params(Checkpoint(path), llm_tensor_map(model, body, head),
                       _llm_unused(body, head, model.llm.tie_word_embeddings), dtype)
  return model, params['llm']


def load_hf_vision(path: str | pathlib.Path,
                   model_config: ml_collections.ConfigDict | None = None,
                   dtype: str | np.dtype | None = None) -> tuple[ml_collections.ConfigDict, Params]:
  """A SiglipVisionModel or SiglipModel folder -> (model config with `vision`, `vit` params).

  Of a full SiglipModel only the vision tower is read (the text tower is known-unused);
  `vision.feature_layers` is kept from `model_config`.
  """
  hf = read_hf_config(path)
  unused: Unused = []
  if hf.get('model_type') == 'siglip':  # full SiglipModel
    hf = {'model_type': 'siglip_vision_model', **hf.get('vision_config', {})}
    unused += [(r'text_model\..*', 'SigLIP text tower'),
               (r'logit_(scale|bias)', 'SigLIP contrastive logit scale and bias')]
  model = _updated(model_config, vision=vision_section(hf))
  checkpoint = Checkpoint(path)
  prefix = _find_prefix(checkpoint.names(), ('vision_model.', ''),
                        'embeddings.patch_embedding.weight', 'SigLIP vision tower')
  params = read_params(checkpoint, vision_tensor_map(model, prefix),
                       unused + _vision_unused(prefix), dtype)
  return model, params['vit']


# LLaVA tensor-name layouts: (LLM body, lm_head, vision tower, projector, image_newline).
_LLAVA_LAYOUTS = (
    ('model.language_model.', 'lm_head.weight', 'model.vision_tower.',
     'model.multi_modal_projector.', 'model.image_newline'),  # transformers >= 4.52 in memory
    ('language_model.model.', 'language_model.lm_head.weight', 'vision_tower.',
     'multi_modal_projector.', 'image_newline'),  # older checkpoints; also as transformers 5 saves
)
_LLAVA_DEFAULTS = {  # HF defaults of LlavaConfig / LlavaOnevisionConfig
    'llava': dict(vision_feature_layer=-2, vision_feature_select_strategy='default',
                  image_token_index=32000, projector_hidden_act='gelu',
                  multimodal_projector_bias=True, tie_word_embeddings=False),
    'llava_onevision': dict(vision_feature_layer=-1, vision_feature_select_strategy='full',
                            image_token_index=151646, video_token_index=151647,
                            projector_hidden_act='gelu', multimodal_projector_bias=True,
                            tie_word_embeddings=False),
}
_LLAVA_TEXT_MODEL = {'llava': 'llama', 'llava_onevision': 'qwen2'}  # when text_config has none


def llava_model_config(hf: dict[str, Any], model_config: ml_collections.ConfigDict | None = None,
                       fusion: str = 'concat') -> ml_collections.ConfigDict:
  """A LLaVA / LLaVA-OneVision HF config (dict) -> model config (llm, vision, feature layers,
  placeholder ids, `fusion`)."""
  kind = hf.get('model_type')
  if kind not in _LLAVA_DEFAULTS:
    _unsupported('LLaVA architecture', f'model_type={kind!r} (supported: '
                 f'{sorted(_LLAVA_DEFAULTS)})')
  if 'image_token_id' in hf and 'image_token_index' not in hf:
    hf = {**hf, 'image_token_index': hf['image_token_id']}
  c = _with_defaults(hf, _LLAVA_DEFAULTS[kind])
  if c['vision_feature_select_strategy'] != 'full':
    _unsupported('LLaVA option', f'vision_feature_select_strategy='
                 f'{c["vision_feature_select_strategy"]!r}: it drops the first token, meant for '
                 "CLIP's CLS token; a SigLIP tower needs 'full'")
  if c['projector_hidden_act'] != 'gelu':
    _unsupported('LLaVA option', f'projector_hidden_act={c["projector_hidden_act"]!r} (the '
                 'projector uses exact gelu)')
  if not c['multimodal_projector_bias']:
    _unsupported('LLaVA option', 'multimodal_projector_bias=False (the projector has biases)')
  text = {'model_type': _LLAVA_TEXT_MODEL[kind], **c.get('text_config', {})}
  vision = {'model_type': 'clip_vision_model', **c.get('vision_config', {})}  # HF's default
  tie = bool(c['tie_word_embeddings'] or text.get('tie_word_embeddings'))
  layers = c['vision_feature_layer']
  model = _updated(model_config, llm=llm_section(text, tie), vision=vision_section(vision),
                   fusion=fusion)
  model.vision.feature_layers = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
  model.image_token_id = c['image_token_index']
  if 'video_token_index' in c:
    model.video_token_id = c['video_token_index']
  return model


def load_hf_llava(path: str | pathlib.Path,
                  model_config: ml_collections.ConfigDict | None = None,
                  dtype: str | np.dtype | None = None,
                  fusion: str = 'concat') -> tuple[ml_collections.ConfigDict, Params]:
  """A LlavaForConditionalGeneration / LlavaOnevisionForConditionalGeneration folder (SigLIP
  vision, Qwen2/LLaMA text) -> (model config, params with `vit`, `projector`, `llm`,
  `frame_index` (zero)).

  `fusion='viln'` takes the ViT and LLM only: LLaVA's projector maps to the LLM width, LaVi's
  to ctx_dim, so it is then left out (known-unused) for a fresh one.
  """
  model = llava_model_config(read_hf_config(path), model_config, fusion)
  checkpoint = Checkpoint(path)
  names = checkpoint.names()
  body = _find_prefix(names, [layout[0] for layout in _LLAVA_LAYOUTS], 'embed_tokens.weight',
                      'LLaVA language model')
  _, head, tower, projector, newline = next(l for l in _LLAVA_LAYOUTS if l[0] == body)
  vision = _find_prefix(names, (tower + 'vision_model.', tower),
                        'embeddings.patch_embedding.weight', 'LLaVA vision tower')
  entries = llm_tensor_map(model, body, head) + vision_tensor_map(model, vision)
  unused = (_llm_unused(body, head, model.llm.tie_word_embeddings) + _vision_unused(vision) +
            [(re.escape(newline), 'OneVision AnyRes row separator; LaVi marks crops with the '
              'frame-index embedding')])
  frame_index = frame_index_entry(model)
  if fusion == 'concat':
    entries += projector_tensor_map(model, projector)
    if frame_index.hf_name in names:  # written by convert.to_torch
      entries.append(frame_index)
  else:
    unused += [(re.escape(projector) + r'.*', "LLaVA's projector (to the LLM width); LaVi's "
                'projector is initialised fresh'),
               (re.escape(frame_index.hf_name), "the frame-index embedding of LLaVA's projector")]
  params = read_params(checkpoint, entries, unused, dtype)
  if fusion == 'concat' and 'frame_index' not in params:
    frame_dtype = params['projector']['linear_2']['bias'].dtype
    params['frame_index'] = {'embedding': np.zeros(
        (model.projector.max_frames, lavi_config.ctx_dim(model)), frame_dtype)}
  return model, params


def load_hf_lavi(path: str | pathlib.Path, dtype: str | np.dtype | None = None
                 ) -> tuple[ml_collections.ConfigDict, Params]:
  """A `convert.to_torch` export -> (model config, every LaVi parameter).

  The model config is the export's `lavi_config` with the LLM and vision sections (and, for a
  LLaVA export, feature layers and placeholder ids) from its Hugging Face configs.
  """
  hf = read_hf_config(path)
  try:
    model = lavi_config.from_export_config(hf, str(path))
  except lavi_config.ConfigError as e:
    raise ConversionError(f'unsupported export: {e}') from e
  if model.fusion == 'concat':
    return load_hf_llava(path, model, dtype, fusion='concat')
  text = hf.get('text_config', {})
  model = _updated(model, llm=llm_section(text, text.get('tie_word_embeddings')),
                   vision=vision_section(hf.get('vision_config', {})))
  lavi_config.validate_model(model)
  body, head, vision, _ = EXPORT_LAYOUTS['viln']
  params = read_params(Checkpoint(path), export_tensor_map(model),
                       _llm_unused(body, head, model.llm.tie_word_embeddings) +
                       _vision_unused(vision), dtype)
  return model, params


# ---------------------------------------------------------------------------------------------
# Merging into a LaVi parameter tree.

def merge_params(base: Params, imported: Params) -> Params:
  """`base` (a full LaVi tree; leaves arrays or jax.ShapeDtypeStructs) with the leaves of
  `imported` put in their place, cast to base's dtypes. Every imported leaf must exist in `base`
  with the same shape."""
  flat = traverse_util.flatten_dict(base, sep='/')
  new = traverse_util.flatten_dict(imported, sep='/')
  unknown = sorted(set(new) - set(flat))
  if unknown:
    raise ConversionError(f'imported parameters not in the LaVi tree: {_format_names(unknown)}')
  wrong = [f'{p} (LaVi {tuple(flat[p].shape)}, imported {tuple(v.shape)})'
           for p, v in new.items() if tuple(flat[p].shape) != tuple(v.shape)]
  if wrong:
    raise ConversionError(f'imported parameters of the wrong shape: {_format_names(wrong)}')
  for p, v in new.items():
    flat[p] = np.asarray(v, dtype=flat[p].dtype)
  return traverse_util.unflatten_dict(flat, sep='/')


def init_with_imported(model: ml_collections.ConfigDict, imported: Params,
                       rng: jax.Array) -> Params:
  """A full LaVi parameter tree: the leaves of `imported`, the rest (conditioners, projector,
  ...) initialised as the model does. Only the rest is computed (under jit)."""
  def init(key):
    return traverse_util.flatten_dict(nn.unbox(init_params(model, key)), sep='/')

  abstract = jax.eval_shape(init, rng)
  taken = set(traverse_util.flatten_dict(imported, sep='/'))
  fresh = jax.jit(lambda key: {p: v for p, v in init(key).items() if p not in taken})(rng)
  base = traverse_util.unflatten_dict({**abstract, **fresh}, sep='/')
  return merge_params(base, imported)
