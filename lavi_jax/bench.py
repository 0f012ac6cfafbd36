"""Efficiency benchmark: LaVi against LLaVA-style concatenation.

    python -m lavi_jax.bench [--config configs/7b.py] [--out bench.json]

FLOPs come from XLA's cost analysis of the compiled forward programs, built abstractly (no
weights in memory), split into the vision encoder, the projector plus conditioners, and the
LLM. `cost_analysis()` counts a `lax.scan` body once, so the LLM is compiled unscanned with one
and with two layers and extrapolated linearly to the configured depth (exact, since every layer
costs the same). Convention: logits are computed at the text positions only, for both fusions
(the concat model gathers the text positions before the LM head).

Settings (LLaVA-OneVision's): one image with AnyRes 3x3 (10 crops of 729 tokens: 7,290 visual
tokens) plus 64 text tokens, and a 32-frame video at 196 tokens per frame plus 64 text tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from lavi_jax import config as lavi_config
from lavi_jax.models import LaVi, init_params
from lavi_jax.models.lavi import VisualTokens, count_items_so_far, pool_grid
from lavi_jax.models.llm import causal_mask

TEXT_TOKENS = 64
SETTINGS = {'image_anyres_3x3': dict(frames=10, video=False),
            'video_32_frames': dict(frames=32, video=True)}


def _flops(fn: Callable, *abstract_args) -> float:
  """FLOPs of `fn` compiled for the given ShapeDtypeStructs (XLA cost analysis)."""
  analysis = jax.jit(fn).lower(*abstract_args).compile().cost_analysis()
  return float(analysis['flops'])


def _abstract_params(model: ml_collections.ConfigDict):
  return jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))


def _with_layers(model: ml_collections.ConfigDict, layers: int) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict(model.to_dict())
  model.llm.num_layers = layers
  model.scan_layers = False
  model.viln.kv_groups = 1
  model.viln.layers = ()
  return model


def _per_layer_extrapolated(model: ml_collections.ConfigDict,
                            cost: Callable[[ml_collections.ConfigDict], float]) -> float:
  """cost(model) at the configured depth from costs at depths 1 and 2 (layers cost the same)."""
  one, two = cost(_with_layers(model, 1)), cost(_with_layers(model, 2))
  return one + (model.llm.num_layers - 1) * (two - one)


@dataclasses.dataclass
class Breakdown:
  vision: float
  projector_and_conditioners: float
  llm: float

  @property
  def total(self) -> float:
    return self.vision + self.projector_and_conditioners + self.llm

  def as_dict(self) -> dict[str, float]:
    return dict(vision=self.vision, projector_and_conditioners=self.projector_and_conditioners,
                llm=self.llm, total=self.total)


def _visual_shapes(model, frames: int, video: bool):
  side = model.vision.image_size
  pixels = jax.ShapeDtypeStruct((1, frames, side, side, 3), jnp.float32)
  tokens_per_frame = lavi_config.num_visual_tokens_per_frame(model.vision, video)
  return pixels, frames * tokens_per_frame


def forward_breakdown(model: ml_collections.ConfigDict, frames: int, video: bool) -> Breakdown:
  """FLOPs of one request (batch 1, TEXT_TOKENS text tokens, one visual item of `frames`)."""
  model = ml_collections.ConfigDict(model.to_dict())
  model.dtype = 'bfloat16'
  pixels, n_visual = _visual_shapes(model, frames, video)
  lavi = LaVi(model)
  params = _abstract_params(_with_layers(model, 1))
  vis = model.vision
  features = jax.ShapeDtypeStruct(
      (frames, (vis.image_size // vis.patch_size) ** 2, vis.hidden_size * len(vis.feature_layers)),
      jnp.bfloat16)

  def vision(p, x):
    return lavi.apply({'params': p}, x[0], method=lambda m, x: m.vit(x))

  def projector(p, f):
    def run(m, f):
      if video and vis.video_pool > 1:
        f = pool_grid(f, vis.video_pool)
      return m.projector(f)
    return LaVi(_with_layers(model, 1)).apply({'params': p}, f, method=run)

  vision_flops = _flops(vision, params, pixels)
  projector_flops = _flops(projector, params, features)
  ids = jax.ShapeDtypeStruct((1, TEXT_TOKENS), jnp.int32)
  ctx = lavi_config.ctx_dim(model)

  def llm_cost(visual_len: int, conditioned: bool):
    def cost(m_cfg):
      tokens = jax.ShapeDtypeStruct((1, visual_len, ctx), jnp.bfloat16)

      def run(m, ids, tokens):
        b, t = ids.shape
        length = t + (0 if conditioned else visual_len)
        positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        mask = causal_mask(jnp.ones((b, length), bool))
        if conditioned:
          visual = VisualTokens(tokens, jnp.ones(tokens.shape[:2], bool),
                                jnp.zeros(tokens.shape[:2], jnp.int32), ((visual_len, 1, 1),))
          cond = m.conditioning(visual, count_items_so_far(ids, m.cfg))
          return m.llm(ids, positions, mask, cond)
        embeds = jnp.concatenate([m.llm.embed(ids), tokens], axis=1)  # text + visual tokens
        hidden = m.llm.hidden_states(embeds, positions, mask)
        return m.llm.logits(hidden[:, :t])  # logits at text positions only

      return _flops(lambda p, i, v: LaVi(m_cfg).apply({'params': p}, i, v, method=run),
                    _abstract_params(m_cfg), ids, tokens)
    return _per_layer_extrapolated(model, cost)

  if model.fusion == 'concat':
    return Breakdown(vision_flops, projector_flops, llm_cost(n_visual, conditioned=False))
  text_only = _per_layer_extrapolated(
      model, lambda m_cfg: _flops(
          lambda p, i: LaVi(m_cfg).apply({'params': p}, i), _abstract_params(m_cfg), ids))
  conditioned = llm_cost(n_visual, conditioned=True)
  return Breakdown(vision_flops, projector_flops + conditioned - text_only, text_only)


def flops_report(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """{setting: {'viln': breakdown, 'concat': breakdown, ratios}} for both settings."""
  report = {}
  for name, setting in SETTINGS.items():
    rows = {}
    for fusion in ('viln', 'concat'):
      m = ml_collections.ConfigDict(model.to_dict())
      m.fusion = fusion
      rows[fusion] = forward_breakdown(m, setting['frames'], setting['video']).as_dict()
    lavi, concat = rows['viln'], rows['concat']
    report[name] = dict(
        rows, lavi_over_concat=lavi['total'] / concat['total'],
        lavi_bridge_share=lavi['projector_and_conditioners'] / lavi['total'],
        lavi_vision_share=lavi['vision'] / lavi['total'],
        concat_vision_share=concat['vision'] / concat['total'])
  return report


def format_flops(report: dict[str, Any]) -> str:
  lines = [f'{"setting":<18}{"fusion":<8}{"vision":>10}{"proj+cond":>11}{"LLM":>10}'
           f'{"total":>10}   (TFLOPs)']
  for name, row in report.items():
    for fusion in ('viln', 'concat'):
      r = row[fusion]
      lines.append(f'{name:<18}{fusion:<8}{r["vision"] / 1e12:>10.3f}'
                   f'{r["projector_and_conditioners"] / 1e12:>11.3f}{r["llm"] / 1e12:>10.3f}'
                   f'{r["total"] / 1e12:>10.3f}')
    lines.append(f'{"":<18}LaVi / concat = {row["lavi_over_concat"]:.4f}; LaVi bridge share '
                 f'{row["lavi_bridge_share"]:.2%}; vision share LaVi {row["lavi_vision_share"]:.1%}'
                 f', concat {row["concat_vision_share"]:.1%}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/7b.py')
  parser.add_argument('--out', default='bench.json')
  args = parser.parse_args(argv)
  model = lavi_config.load_config_file(args.config).model
  report = {'flops': flops_report(model)}
  print(format_flops(report['flops']))
  epath.Path(args.out).write_text(json.dumps(report, indent=2))
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
