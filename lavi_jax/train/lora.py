"""LoRA and QLoRA adapters as a parameter-tree transform.

A stage with a `lora` section (`train.stages.NAME.lora`, see lavi_jax.config.validate_lora)
freezes the kernels its `targets` regex matches and trains low-rank adapters beside them:

    W_eff = dequant(W) + (alpha / rank) * (A @ B)      A (*lead, in, r), B (*lead, r, out)

`lead` is the stacked layer axis of a scanned stack (`.../layers/...`, nn.scan's axis 0), `in`
the contracted input axes of the kernel flattened (two for attention output projections,
`o_proj` / `out_proj`: (heads, head_dim); one otherwise) and `out` the rest flattened. A is
drawn as Kaiming-uniform, B is zero, so the adapted model starts as the base model.

The adapters live in the train state's parameters under `lora/<target path>/{a,b}_kernel`, so
they are checkpointed and resumed as any parameter, and get optimizer state from the stage's
optimizer; the target kernels stay where they are, frozen. With `quantize='int8'` (QLoRA) a
target kernel is stored as int8 with a float32 absmax scale per output channel at
`lora/<target path>/quant_scale` (its input axes kept as size 1).

Why a tree transform, not qwix's `LoraProvider` or a LoRA `Dense`: the merge happens in the
loss function before `LaVi.apply`, so the model code, its scanned stacks (nn.scan over
`layers`), the custom `Dense` with multi-axis kernels, the converters and the KV-cache decoder
stay untouched; `merge` is also what generation, evaluation and export use. The cost: the
backward pass forms the full-size gradient of each W_eff (as full fine-tuning does) before
reducing it to A and B, and QLoRA dequantises a target's whole stack at once (per step, sharded
as the base). Only dropout 0 is supported.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

ROOT = 'lora'
SEP = '/'
ADAPTERS = ('a_kernel', 'b_kernel')
SCALE = 'quant_scale'
# Trainable adapter paths (the quantisation scales under lora/ stay frozen).
ADAPTER_PATTERN = rf'^{ROOT}/.*/(a|b)_kernel$'
TWO_INPUT_AXES = ('o_proj', 'out_proj')  # kernels (heads, head_dim, *out)


@dataclasses.dataclass(frozen=True)
class Lora:
  """A stage's LoRA settings (config.train.stages.NAME.lora)."""
  targets: str
  rank: int
  alpha: float
  quantize: str  # 'none' | 'int8'

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank


def of_stage(stage_config: ml_collections.ConfigDict) -> Lora | None:
  """The stage's LoRA settings, or None when it trains without adapters."""
  lora = stage_config.get('lora')
  if not lora or not lora.get('rank'):
    return None
  return Lora(lora.targets, lora.rank, float(lora.alpha), lora.get('quantize', 'none'))


def trainable_regex(stage_config: ml_collections.ConfigDict) -> str:
  """The stage's `trainable` regex, extended to its adapters and excluding its LoRA targets."""
  spec = of_stage(stage_config)
  if spec is None:
    return stage_config.trainable
  return rf'^(?!.*(?:{spec.targets}))(?!{ROOT}/)(?:.*(?:{stage_config.trainable}))|{ADAPTER_PATTERN}'


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(params, sep=SEP)


def _unflat(flat: dict):
  return flax.traverse_util.unflatten_dict(flat, sep=SEP)


def _axes(path: str, ndim: int) -> tuple[int, int, int]:
  """(stacked, input, output) axis counts of the kernel at `path`."""
  lead = 1 if re.search(r'(^|/)layers/', path) else 0
  module = path.split(SEP)[-2]
  n_in = 2 if module in TWO_INPUT_AXES else 1
  return lead, n_in, ndim - lead - n_in


def targets(flat: dict, spec: Lora) -> list[str]:
  """Paths of the kernels `spec.targets` matches (outside the lora/ subtree)."""
  pattern = re.compile(spec.targets)
  found = [k for k in flat if not k.startswith(ROOT + SEP) and pattern.search(k)]
  if not found:
    raise ValueError(f'lora.targets {spec.targets!r} matches no parameter; paths look like '
                     f'{next(iter(flat))!r}')
  bad = [k for k in found if not k.endswith('kernel') or len(flat[k].shape) < 2]
  if bad:
    raise ValueError(f'lora.targets {spec.targets!r} matches {bad[:3]}: only dense kernels can '
                     'take adapters (end the regex in /kernel)')
  return found


def _shapes(path: str, shape: tuple[int, ...], rank: int):
  """(A shape, B shape, scale shape) of the adapters of a kernel of `shape`."""
  lead, n_in, _ = _axes(path, len(shape))
  stacked, ins, outs = shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:]
  return (stacked + (math.prod(ins), rank), stacked + (rank, math.prod(outs)),
          stacked + (1,) * n_in + outs)


def quantize(kernel: jax.Array, path: str) -> tuple[jax.Array, jax.Array]:
  """(int8 kernel, float32 scale): symmetric absmax per output channel over the input axes."""
  lead, n_in, _ = _axes(path, kernel.ndim)
  w = kernel.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=tuple(range(lead, lead + n_in)), keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.round(w / scale).astype(jnp.int8), scale


def attach(params, spec: Lora, rng: jax.Array):
  """`params` (a model's tree) with adapters for `spec` (B = 0) and, for QLoRA, int8 targets."""
  flat = dict(_flat(params))
  for i, path in enumerate(targets(flat, spec)):
    kernel = flat[path]
    a_shape, b_shape, _ = _shapes(path, kernel.shape, spec.rank)
    bound = 1.0 / math.sqrt(a_shape[-2])  # Kaiming-uniform (a=sqrt(5)), as PEFT
    a = jax.random.uniform(jax.random.fold_in(rng, i), a_shape, jnp.float32, -bound, bound)
    flat[f'{ROOT}/{path}/a_kernel'] = a.astype(kernel.dtype)
    flat[f'{ROOT}/{path}/b_kernel'] = jnp.zeros(b_shape, kernel.dtype)
    if spec.quantize == 'int8':
      flat[path], flat[f'{ROOT}/{path}/{SCALE}'] = quantize(kernel, path)
  return _unflat(flat)


def merge(params, spec: Lora):
  """The model's tree: each target W -> dequant(W) + (alpha / rank) * A @ B, in W's float dtype
  (the adapters' dtype for an int8 base); the lora/ subtree is dropped. Differentiable."""
  flat = _flat(params)
  out = {k: v for k, v in flat.items() if not k.startswith(ROOT + SEP)}
  for path in targets(out, spec):
    a, b = flat[f'{ROOT}/{path}/a_kernel'], flat[f'{ROOT}/{path}/b_kernel']
    kernel = out[path]
    scale = flat.get(f'{ROOT}/{path}/{SCALE}')
    base = kernel.astype(jnp.float32) if scale is None else kernel.astype(jnp.float32) * scale
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)).reshape(kernel.shape)
    dtype = a.dtype if scale is not None else kernel.dtype
    out[path] = (base + spec.scaling * delta).astype(dtype)
  return _unflat(out)


def abstract(abstract_params, spec: Lora):
  """ShapeDtypeStructs of `attach(abstract_params, spec, rng)`, shardings included where the
  base has them (see `shardings`)."""
  attached = jax.eval_shape(lambda p: attach(p, spec, jax.random.key(0)), abstract_params)
  flat, base = _flat(attached), _flat(abstract_params)
  if all(getattr(v, 'sharding', None) is not None for v in base.values()):
    specs = _flat(shardings(_unflat({k: v.sharding for k, v in base.items()}), base, spec))
    flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=specs[k]) for k, v in flat.items()}
  return _unflat(flat)


def shardings(param_shardings, abstract_params, spec: Lora):
  """NamedShardings of the attached tree: A keeps the base's stacked and (single) input axis
  sharding, B its stacked and (single) output axis sharding; the scale follows the base with
  its input axes unsharded."""
  flat = dict(_flat(param_shardings))
  shapes = _flat(abstract_params)
  for path in targets(shapes, spec):
    base = flat[path]
    ndim = len(shapes[path].shape)
    lead, n_in, n_out = _axes(path, ndim)
    dims = list(base.spec) + [None] * (ndim - len(base.spec))
    stacked, ins, outs = dims[:lead], dims[lead:lead + n_in], dims[lead + n_in:]
    named = lambda *d: NamedSharding(base.mesh, PartitionSpec(*d))
    flat[f'{ROOT}/{path}/a_kernel'] = named(*stacked, ins[0] if n_in == 1 else None, None)
    flat[f'{ROOT}/{path}/b_kernel'] = named(*stacked, None, outs[0] if n_out == 1 else None)
    if spec.quantize == 'int8':
      flat[f'{ROOT}/{path}/{SCALE}'] = named(*stacked, *([None] * n_in), *outs)
  return _unflat(flat)
