"""Efficiency benchmark: LaVi against LLaVA-style concatenation.

    python -m lavi_jax.bench [--config configs/7b.py] [--out bench.json] [--quick]
        [--skip-flops] [--skip-hf]

Four parts, one JSON report:
- `flops`: counted at `--config` (below); `cache`: the KV cache and visual memory bytes of the
  same requests answered with 16 new tokens (the shapes of the lowered prefill's outputs).
- `measured`: latency and memory of generation on this machine (`bench_latency`), LaVi and
  concat each in a fresh process, and LaVi in bfloat16 beside them; `hf`: the same requests with Hugging Face LLaVA-OneVision
  (`bench_hf`); `accelerator`: decode against the bandwidth bound and train MFU
  (`bench_accelerator`, null on the CPU); `targets`: the ratios against their targets.
`--quick` measures configs/tiny.py with a few tokens (same schema; the processes then run side
by side, so its timings mean nothing).

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
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from lavi_jax import bench_accelerator, bench_hf, bench_latency
from lavi_jax import config as lavi_config
from lavi_jax.inference import decode
from lavi_jax.models import LaVi, abstract_params
from lavi_jax.models.lavi import VisualTokens, count_items_so_far, pool_grid
from lavi_jax.models.attention import Mask

TEXT_TOKENS = 64
SHORT_ANSWER = 16  # new tokens for the cache bytes
SETTINGS = {'image_anyres_3x3': dict(frames=10, video=False),
            'video_32_frames': dict(frames=32, video=True)}


def _flops(fn: Callable, *abstract_args) -> float:
  """FLOPs of `fn` compiled for the given ShapeDtypeStructs (XLA cost analysis)."""
  analysis = jax.jit(fn).lower(*abstract_args).compile().cost_analysis()
  return float(analysis['flops'])


def _with_layers(model: ml_collections.ConfigDict, layers: int) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict(model.to_dict())
  model.llm.num_layers = layers
  model.scan_layers = model.vision.scan_layers = False
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
  one_layer = _with_layers(model, 1)  # unscanned: cost_analysis counts a loop body once
  lavi = LaVi(one_layer)
  params = abstract_params(one_layer)
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
    return lavi.apply({'params': p}, f, method=run)

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
        mask = Mask.causal_padded(jnp.ones((b, length), bool))
        if conditioned:
          visual = VisualTokens(tokens, jnp.arange(visual_len)[None],
                                jnp.ones(tokens.shape[:2], bool),
                                jnp.zeros(tokens.shape[:2], jnp.int32), ((visual_len, 1),))
          cond = m.conditioning(visual, count_items_so_far(ids, m.cfg))
          return m.llm(ids, positions, mask, cond)
        embeds = jnp.concatenate([m.llm.embed(ids), tokens], axis=1)  # text + visual tokens
        hidden = m.llm.hidden_states(embeds, positions, mask)
        return m.llm.logits(hidden[:, :t])  # logits at text positions only

      return _flops(lambda p, i, v: LaVi(m_cfg).apply({'params': p}, i, v, method=run),
                    abstract_params(m_cfg), ids, tokens)
    return _per_layer_extrapolated(model, cost)

  if model.fusion == 'concat':
    return Breakdown(vision_flops, projector_flops, llm_cost(n_visual, conditioned=False))
  text_only = _per_layer_extrapolated(
      model, lambda m_cfg: _flops(
          lambda p, i: LaVi(m_cfg).apply({'params': p}, i), abstract_params(m_cfg), ids))
  conditioned = llm_cost(n_visual, conditioned=True)
  return Breakdown(vision_flops, projector_flops + conditioned - text_only, text_only)


def _per_setting_and_fusion(model: ml_collections.ConfigDict,
                            measure: Callable[[ml_collections.ConfigDict, dict], Any]):
  """{setting name: {fusion: measure(model with that fusion, setting)}} over SETTINGS."""
  out = {}
  for name, setting in SETTINGS.items():
    out[name] = {}
    for fusion in ('viln', 'concat'):
      m = ml_collections.ConfigDict(model.to_dict())
      m.fusion = fusion
      out[name][fusion] = measure(m, setting)
  return out


def flops_report(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """{setting: {'viln': breakdown, 'concat': breakdown, ratios}} for both settings."""
  report = {}
  per_fusion = _per_setting_and_fusion(
      model, lambda m, setting: forward_breakdown(m, setting['frames'], setting['video']).as_dict())
  for name, rows in per_fusion.items():
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


def _cache_bytes(m: ml_collections.ConfigDict, setting: dict) -> dict[str, int]:
  """Cache bytes of one setting's request answered with SHORT_ANSWER new tokens, from the
  lowered prefill's output shapes (nothing allocated)."""
  pixels, _ = _visual_shapes(m, setting['frames'], setting['video'])
  ids = jnp.zeros((1, TEXT_TOKENS), jnp.int32).at[:, 1].set(
      m.video_token_id if setting['video'] else m.image_token_id)
  visual = {'videos' if setting['video'] else 'images': dict(pixel_values=pixels)}
  prefill, _ = decode.programs(m, abstract_params(m), ids, jnp.ones(ids.shape, bool), **visual,
                               max_new_tokens=SHORT_ANSWER)
  return bench_latency.cache_bytes(prefill)


def cache_report(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """Cache bytes (KV cache + visual memory) of each setting's request, LaVi and concat."""
  return {name: dict(rows, lavi_over_concat=rows['viln']['total_bytes'] /
                     rows['concat']['total_bytes'])
          for name, rows in _per_setting_and_fusion(model, _cache_bytes).items()}


def counted(model_dict: dict) -> dict[str, Any]:
  """{'flops': flops_report, 'cache': cache_report} of a model config given as a dict (for
  `bench_latency.in_fresh_processes`)."""
  model = ml_collections.ConfigDict(model_dict)
  return dict(flops=flops_report(model), cache=cache_report(model))


TARGETS = (  # (name, where in the report, at most / at least, value)
    ('ttft_lavi_over_concat', ('measured', 'lavi_over_concat', 'ttft_s'), 'at most', 1 / 3),
    ('cache_lavi_over_concat', ('measured', 'lavi_over_concat', 'cache_short_bytes'), 'at most',
     1 / 20),
    ('e2e_short_speedup_over_hf', ('hf', 'speedup', 'viln', 'e2e_short_s'), 'at least', 5.0),
)


def targets(report: dict[str, Any]) -> dict[str, Any]:
  """Each target's measured values per batch size and whether all of them meet it."""
  out = {}
  for name, (*path, key), bound, value in TARGETS:
    node = report
    for part in path:
      node = (node or {}).get(part)
    if node is None:
      out[name] = dict(target=f'{bound} {value:.4g}', met=None)
      continue
    values = {b: node[b][key] for b in node if b.startswith('batch_')}
    ok = [v <= value if bound == 'at most' else v >= value for v in values.values()]
    out[name] = dict(values, target=f'{bound} {value:.4g}', met=all(ok))
  return out


def format_measured(report: dict[str, Any]) -> str:
  """Per batch size: each latency for LaVi, concat, their ratio, and HF and HF / LaVi."""
  measured, hf = report['measured'], report.get('hf')
  lines = [f'{"":<22}{"LaVi":>10}{"concat":>10}{"ratio":>8}' + (f'{"HF":>10}{"HF/LaVi":>9}'
                                                                 if hf else '')]
  for batch in bench_latency.BATCHES:
    b = f'batch_{batch}'
    lines.append(f'batch {batch}')
    for key in bench_latency.LATENCIES:
      lavi, concat = measured['viln'][b][key], measured['concat'][b][key]
      line = f'  {key:<20}{lavi:>10.4f}{concat:>10.4f}{lavi / concat:>8.3f}'
      if hf:
        line += f'{hf[b][key]:>10.4f}{hf[b][key] / lavi:>9.2f}'
      lines.append(line)
    for n in ('short', 'long'):
      lavi, concat = (measured[f][b][f'cache_{n}']['total_bytes'] for f in ('viln', 'concat'))
      lines.append(f'  {"cache_" + n + " (MB)":<20}{lavi / 1e6:>10.3f}{concat / 1e6:>10.3f}'
                   f'{lavi / concat:>8.3f}')
  lines.append(f'LaVi in bfloat16 / as measured ({measured["config"]["dtype"]}): ' + ', '.join(
      f'batch {batch} {key} {row[key]:.3f}' for batch in bench_latency.BATCHES
      for row in [measured['bfloat16_over_float32'][f'batch_{batch}']]
      for key in ('ttft_s', 'decode_s_per_token', 'decode_memory_bytes')))
  rss = [measured[f]['peak_rss_bytes'] / 1e6 for f in ('viln', 'concat')]
  lines.append(f'peak RSS (MB)         {rss[0]:>10.0f}{rss[1]:>10.0f}{rss[0] / rss[1]:>8.3f}' +
               (f'{hf["peak_rss_bytes"] / 1e6:>10.0f}' if hf else ''))
  for name, row in report['targets'].items():
    lines.append(f'target {name}: {row["target"]}, met: {row["met"]}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/7b.py', help='model config of the FLOPs')
  parser.add_argument('--out', default='bench.json')
  parser.add_argument('--quick', action='store_true', help='tiny sizes, a few tokens')
  parser.add_argument('--skip-flops', action='store_true')
  parser.add_argument('--skip-hf', action='store_true')
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  # Several processes share an accelerator in turn: none may take most of its memory up front.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  report = dict(command=' '.join(['python -m lavi_jax.bench', *argv]), flops=None, cache=None,
                hf=None)
  model, run = bench_latency.measured_model(args.quick), bench_latency.settings(args.quick)
  calls = bench_latency.measured_calls(model, run)
  if not args.skip_hf:
    calls['hf'] = (bench_hf.measure_hf, (model.to_dict(), run))
  if not args.skip_flops:
    counted_model = lavi_config.load_config_file('configs/tiny.py' if args.quick else args.config)
    calls['counted'] = (counted, (counted_model.model.to_dict(),))
  results = bench_latency.in_fresh_processes(calls, parallel=args.quick)
  if 'counted' in results:
    report.update(results['counted'])
    print(format_flops(report['flops']))
  report['measured'] = dict(
      config=bench_latency.model_sizes(model), settings=dict(run, batches=bench_latency.BATCHES),
      device=jax.devices()[0].device_kind, backend=jax.default_backend(),
      viln=results['viln'], concat=results['concat'], viln_bfloat16=results['viln_bfloat16'],
      lavi_over_concat=bench_latency.ratios(results['viln'], results['concat']),
      bfloat16_over_float32=bench_latency.ratios(results['viln_bfloat16'], results['viln']))
  if 'hf' in results:
    report['hf'] = dict(results['hf'], speedup=bench_hf.speedups(
        results['hf'], dict(viln=results['viln'], concat=results['concat'])))
  report['accelerator'] = bench_accelerator.accelerator_report(model, run, results['viln'])
  report['targets'] = targets(report)
  print(format_measured(report))
  epath.Path(args.out).write_text(json.dumps(report, indent=2))
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
