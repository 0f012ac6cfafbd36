"""On an accelerator: LaVi's decode tokens/s at batch 1 against the memory-bandwidth bound, and
the MFU of a training step, at the measured model's sizes. On the CPU nothing is measured.

The bound: every decode step reads the LLM's and conditioners' parameters, the whole KV cache,
and for every modulated norm the visual keys and values its conditioner attends over (the
vision tower and projector only run at prefill), so tokens/s <= bandwidth / those bytes.
MFU: the analytic FLOPs of the step (`train.flops.train_step_flops`, everything trained) over
the median step time and the device's peak bf16 FLOP/s.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lavi_jax import config as lavi_config
from lavi_jax import sharding
from lavi_jax.bench_latency import nbytes, random_params, request
from lavi_jax.train import flops as flops_lib
from lavi_jax.train import optimizer as opt_lib
from lavi_jax.train import state as state_lib
from lavi_jax.train import step as step_lib

# Peak memory bandwidth (bytes/s) per device, matched against `device.device_kind`.
PEAK_BANDWIDTH = (
    ('TPU v6', 1640e9), ('TPU v5p', 2765e9), ('TPU v5 lite', 819e9), ('TPU v5e', 819e9),
    ('TPU v4', 1200e9), ('H200', 4.8e12), ('H100', 3.35e12), ('A100', 2.0e12), ('L4', 300e9),
)
NOT_MEASURED = dict(decode_tokens_per_s=None, bandwidth_bound_tokens_per_s=None,
                    fraction_of_bound=None, train_step_s=None, train_step_mfu=None)
TRAIN_BATCH = 8


def peak_bandwidth(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind.lower()
  return next((bw for name, bw in PEAK_BANDWIDTH if name.lower() in kind), None)


def decode_bytes_per_token(model: ml_collections.ConfigDict, params,
                           cache: dict[str, int]) -> float:
  """Bytes a decode step reads: all parameters but the vision tower and projector, the KV cache,
  and for each modulated norm its group's share of the visual memory (`cache` as from
  `bench_latency.cache_bytes`)."""
  read = {k: v for k, v in params.items() if k not in ('vit', 'projector', 'frame_index')}
  visual = cache['visual_memory_bytes'] / model.viln.kv_groups
  return (nbytes(read) + cache['kv_cache_bytes'] +
          visual * lavi_config.num_modulated_norms(model))


def train_step_time(model: ml_collections.ConfigDict, params, text_tokens: int,
                    repeats: int) -> float:
  """Median seconds of a jitted training step (everything trained, AdamW) on one device."""
  config = lavi_config.base_config()
  config.model = model
  config.train.stage_order = ('train',)
  config.train.stages = dict(train=dict(steps=1, trainable='.*', learning_rate=1e-4,
                                        warmup_steps=0, lr_scale=''))
  stage = opt_lib.stages(config.train)[0]
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, _ = state_lib.create(config, stage, mesh, jax.random.key(0), params)
  ids, mask, pixels = request(model, TRAIN_BATCH, text_tokens)
  batch = dict(input_ids=ids, text_mask=mask, images=dict(pixel_values=pixels),
               targets=np.roll(ids, -1, axis=1), loss_mask=mask)
  tx = opt_lib.make_optimizer(stage, config.train, opt_lib.split(state.params, '.*')[0])
  step = jax.jit(step_lib.make_train_step(config, stage, tx), donate_argnums=0)
  times = []
  with sharding.activate(mesh, config.mesh):
    for i in range(repeats + 1):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      if i:  # the first call compiles
        times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(model: ml_collections.ConfigDict, run: dict[str, int], lavi: dict[str, Any],
            peak_flops: float, bandwidth: float) -> dict[str, Any]:
  """Figures from LaVi's measured latencies (`bench_latency.measure_fusion`) and a timed
  training step, against the given device peaks."""
  row = lavi['batch_1']
  tokens_per_s = 1 / row['decode_s_per_token']
  params = random_params(model)
  bound = bandwidth / decode_bytes_per_token(model, params, row['cache_long'])
  step_s = train_step_time(model, params, run['text_tokens'], run['repeats'])
  step_flops = flops_lib.train_step_flops(
      flops_lib.forward_flops(model, TRAIN_BATCH, run['text_tokens'], image_frames=1), True)
  return dict(decode_tokens_per_s=tokens_per_s, bandwidth_bound_tokens_per_s=bound,
              fraction_of_bound=tokens_per_s / bound, train_step_s=step_s,
              train_step_mfu=step_flops / step_s / peak_flops, peak_flops_per_s=peak_flops,
              peak_bandwidth_bytes_per_s=bandwidth, train_batch=TRAIN_BATCH)


def accelerator_report(model: ml_collections.ConfigDict, run: dict[str, int],
                       lavi: dict[str, Any]) -> dict[str, Any]:
  """`measure` on an accelerator with known peaks; on the CPU, every figure None."""
  if jax.default_backend() == 'cpu':
    return dict(NOT_MEASURED, status='not measured: CPU')
  peak, bandwidth = flops_lib.peak_flops_per_device(), peak_bandwidth()
  if not peak or not bandwidth:
    return dict(NOT_MEASURED, status=f'not measured: unknown peaks of '
                                     f'{jax.devices()[0].device_kind}')
  return dict(measure(model, run, lavi, peak, bandwidth), status='measured')
