"""Measured generation latency and memory: LaVi against concat on the machine at hand.

Shapes: B batch (1 and 8), T prompt length (text tokens, one image placeholder among them),
N new tokens (a short and a long answer), S image side.

Each request is one image (a single crop) and T text tokens, answered greedily by
`lavi_jax.inference.decode.generate`, the code path of the `Generator` and the command line.
Every shape is compiled and run once before it is timed; times are medians over `repeats` runs.
From one run of N new tokens: the time to first token (prefill and the first token, taken when
the first token reaches the host), the end-to-end time, and the decode time per token
((end to end - first token) / (N - 1), from the long answer).

Memory: XLA's memory analysis of the compiled prefill and decode programs (argument + output +
temp - aliased bytes), the KV cache and visual memory bytes of the decode state (from the prefill
program's output arrays), and the peak resident set size of a fresh process that builds the
model and runs every measurement of one fusion (`baseline_rss_bytes`: the same process after
building the parameters, before generating).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lavi_jax import config as lavi_config
from lavi_jax.inference import decode
from lavi_jax.models import abstract_params

BATCHES = (1, 8)
# The latencies of `latency_row`, per batch size.
LATENCIES = ('ttft_s', 'decode_s_per_token', 'e2e_short_s', 'e2e_long_s')


def measured_model(quick: bool) -> ml_collections.ConfigDict:
  """configs/tiny.py (quick), else a model small enough for a CPU with 0.5B's architecture and
  SigLIP's 384 px / 14 patch grid (729 visual tokens per image). float32 on the CPU, else bf16."""
  if quick:
    return lavi_config.load_config_file('configs/tiny.py').model
  model = lavi_config.load_config_file('configs/0_5b.py').model
  model.update(dtype='float32' if jax.default_backend() == 'cpu' else 'bfloat16', remat='none',
               image_token_id=1, video_token_id=2)
  model.llm.update(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=12,
                   num_heads=8, num_kv_heads=2)
  model.vision.update(hidden_size=192, intermediate_size=768, num_layers=3, num_heads=3)
  model.projector.ctx_dim = 256
  model.viln.update(heads=2, head_dim=32, mlp_dim=256)
  return model


def settings(quick: bool) -> dict[str, int]:
  """Prompt length, short and long answers, timed repeats."""
  if quick:
    return dict(text_tokens=16, short_new_tokens=2, long_new_tokens=4, repeats=1)
  return dict(text_tokens=64, short_new_tokens=16, long_new_tokens=256, repeats=3)


def model_sizes(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """The measured model's sizes, for the report."""
  vision, llm = model.vision, model.llm
  return dict(llm={k: llm[k] for k in ('vocab_size', 'hidden_size', 'intermediate_size',
                                       'num_layers', 'num_heads', 'num_kv_heads')},
              vision={k: vision[k] for k in ('image_size', 'patch_size', 'hidden_size',
                                             'intermediate_size', 'num_layers', 'num_heads')},
              visual_tokens_per_image=lavi_config.num_visual_tokens_per_frame(vision, False),
              ctx_dim=model.projector.ctx_dim,
              conditioner=model.viln.to_dict(),
              dtype=model.dtype)


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_fresh_processes(calls: dict[str, tuple[Callable, tuple]], parallel: bool = False):
  """{name: fn(*args)}, each call in a new Python process (so that its peak RSS is its own);
  one after the other unless `parallel` (then their timings disturb each other)."""
  context = multiprocessing.get_context('spawn')
  workers = len(calls) if parallel else 1
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                              max_tasks_per_child=1) as pool:
    futures = {name: pool.submit(fn, *args) for name, (fn, args) in calls.items()}
    results = {}
    for name, future in futures.items():
      results[name] = future.result()
      print(f'{name}: done', flush=True)
    return results


def random_params(model: ml_collections.ConfigDict, seed: int = 0):
  """Parameters drawn from N(0, 0.02^2), without compiling `init` (timings do not depend on the
  values)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.02, x.shape).astype(x.dtype)),
                      abstract_params(model))


def timed(run: Callable[[Callable[..., Any]], Any], repeats: int) -> dict[str, float]:
  """run(on_tokens) generates once, calling on_tokens(...) first when the first token is on the
  host. After one untimed run: median seconds to the first token and to the end."""

  def once():
    marks = []
    start = time.perf_counter()
    run(lambda *_: marks.append(time.perf_counter()))
    return marks[0] - start, time.perf_counter() - start

  once()
  first, total = zip(*(once() for _ in range(repeats)))
  return dict(ttft_s=statistics.median(first), e2e_s=statistics.median(total))


def latency_row(short: dict[str, float], long: dict[str, float],
                long_new_tokens: int) -> dict[str, float]:
  """The reported latencies of one batch size from the short and long answers' timings."""
  return dict(ttft_s=short['ttft_s'], e2e_short_s=short['e2e_s'], e2e_long_s=long['e2e_s'],
              decode_s_per_token=(long['e2e_s'] - long['ttft_s']) / (long_new_tokens - 1))


def request(model: ml_collections.ConfigDict, batch: int, text_tokens: int, seed: int = 0):
  """input_ids (B, T) (image placeholder at 1), text_mask (B, T), pixels (B, 1, S, S, 3)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, model.llm.vocab_size, (batch, text_tokens)).astype(np.int32)
  ids[:, 1] = model.image_token_id
  side = model.vision.image_size
  pixels = rng.uniform(-1, 1, (batch, 1, side, side, 3)).astype(np.float32)
  return ids, np.ones(ids.shape, bool), pixels


def nbytes(tree) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of a tree."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _memory(compiled: jax.stages.Compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  out = dict(argument_bytes=stats.argument_size_in_bytes, output_bytes=stats.output_size_in_bytes,
             temp_bytes=stats.temp_size_in_bytes, alias_bytes=stats.alias_size_in_bytes)
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] + out['temp_bytes'] -
                        out['alias_bytes'])
  return out


def cache_bytes(prefill: jax.stages.Lowered) -> dict[str, int]:
  """KV cache and visual memory bytes of the decode state a prefill program returns."""
  state, memory = prefill.out_info
  kv, visual = nbytes((state.cache.k, state.cache.v)), nbytes(memory)
  return dict(kv_cache_bytes=kv, visual_memory_bytes=visual, total_bytes=kv + visual)


def measure_fusion(model_dict: dict, fusion: str, run: dict[str, int]) -> dict[str, Any]:
  """Latency and memory of one fusion at every batch size (meant for a fresh process)."""
  model = ml_collections.ConfigDict(model_dict)
  model.fusion = fusion
  params = random_params(model)
  report = dict(baseline_rss_bytes=peak_rss_bytes())
  for batch in BATCHES:
    ids, mask, pixels = request(model, batch, run['text_tokens'])
    inputs = dict(input_ids=ids, text_mask=mask, images=dict(pixel_values=pixels))

    def generate(new_tokens):
      return lambda on_tokens: decode.generate(
          model, params, **inputs, max_new_tokens=new_tokens, stream_every=new_tokens,
          on_tokens=on_tokens)

    short, long = (timed(generate(run[f'{n}_new_tokens']), run['repeats'])
                   for n in ('short', 'long'))
    row = latency_row(short, long, run['long_new_tokens'])
    abstract = jax.tree.map(jnp.asarray, inputs)
    for n in ('short', 'long'):
      prefill, loop = decode.programs(model, params, **abstract,
                                      max_new_tokens=run[f'{n}_new_tokens'])
      row[f'cache_{n}'] = cache_bytes(prefill)
    # The long answer's programs (the larger cache); compiled already by the timed runs.
    row['memory'] = dict(prefill=_memory(prefill.compile()), decode=_memory(loop.compile()))
    report[f'batch_{batch}'] = row
  report['peak_rss_bytes'] = peak_rss_bytes()
  return report


def ratios(lavi: dict[str, Any], concat: dict[str, Any]) -> dict[str, Any]:
  """lavi / concat (two `measure_fusion` results) of every latency and of the cache and program
  memory bytes."""
  out = {}
  for batch in BATCHES:
    a, b = lavi[f'batch_{batch}'], concat[f'batch_{batch}']
    row = {k: a[k] / b[k] for k in LATENCIES}
    for n in ('short', 'long'):
      row[f'cache_{n}_bytes'] = a[f'cache_{n}']['total_bytes'] / b[f'cache_{n}']['total_bytes']
    for program in ('prefill', 'decode'):
      row[f'{program}_memory_bytes'] = (a['memory'][program]['total_bytes'] /
                                        b['memory'][program]['total_bytes'])
    out[f'batch_{batch}'] = row
  out['peak_rss_bytes'] = lavi['peak_rss_bytes'] / concat['peak_rss_bytes']
  return out


def measured_calls(model: ml_collections.ConfigDict, run: dict[str, int]):
  """{name: (measure_fusion, args)} for `in_fresh_processes`: 'viln' and 'concat' as `model` is,
  and 'viln_bfloat16', LaVi with parameters and computation in bfloat16 (as served with
  `--dtype bfloat16`)."""
  bf16 = ml_collections.ConfigDict(model.to_dict())
  bf16.dtype = bf16.param_dtype = 'bfloat16'
  calls = {fusion: (measure_fusion, (model.to_dict(), fusion, run)) for fusion in ('viln', 'concat')}
  calls['viln_bfloat16'] = (measure_fusion, (bf16.to_dict(), 'viln', run))
  return calls
