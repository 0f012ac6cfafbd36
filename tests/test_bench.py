"""`python -m lavi_jax.bench --quick` writes every field of the report, with ratios that agree
with the raw figures; the accelerator figures are computed from a measured step (on the CPU
here, against made-up peaks)."""

import json
import pathlib
import subprocess
import sys

import pytest

from lavi_jax import bench_accelerator, bench_latency

REPO = pathlib.Path(__file__).resolve().parents[1]
LATENCIES = ('ttft_s', 'decode_s_per_token', 'e2e_short_s', 'e2e_long_s')
BATCHES = ('batch_1', 'batch_8')


def _grid_side():
  vision = bench_latency.measured_model(True).vision
  return vision.image_size // vision.patch_size


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'bench.json'
  subprocess.run([sys.executable, '-m', 'lavi_jax.bench', '--quick', '--out', str(out)],
                 cwd=REPO, check=True, timeout=600)
  return json.loads(out.read_text())


def test_flops_and_cache_bytes(report):
  assert report['command'].startswith('python -m lavi_jax.bench --quick')
  for name in ('image_anyres_3x3', 'video_32_frames'):
    flops, cache = report['flops'][name], report['cache'][name]
    for fusion in ('viln', 'concat'):
      assert all(v > 0 for v in flops[fusion].values())
      assert cache[fusion]['total_bytes'] == (cache[fusion]['kv_cache_bytes'] +
                                              cache[fusion]['visual_memory_bytes'])
    assert flops['lavi_over_concat'] == pytest.approx(flops['viln']['total'] /
                                                      flops['concat']['total'])
    assert cache['concat']['visual_memory_bytes'] == 0
    assert cache['lavi_over_concat'] == pytest.approx(cache['viln']['total_bytes'] /
                                                      cache['concat']['total_bytes'])


def test_measured_latency_and_memory(report):
  measured = report['measured']
  assert measured['backend'] == 'cpu'
  assert measured['config']['visual_tokens_per_image'] == _grid_side() ** 2
  assert measured['settings']['batches'] == [1, 8]
  for fusion in ('viln', 'concat'):
    rows = measured[fusion]
    assert rows['peak_rss_bytes'] >= rows['baseline_rss_bytes'] > 0
    for batch in BATCHES:
      row = rows[batch]
      assert all(row[k] > 0 for k in LATENCIES)
      for n in ('short', 'long'):
        cache = row[f'cache_{n}']
        assert cache['kv_cache_bytes'] > 0
        assert (cache['visual_memory_bytes'] > 0) == (fusion == 'viln')
        assert cache['total_bytes'] == cache['kv_cache_bytes'] + cache['visual_memory_bytes']
      for program in ('prefill', 'decode'):
        memory = row['memory'][program]
        assert memory['total_bytes'] == (memory['argument_bytes'] + memory['output_bytes'] +
                                         memory['temp_bytes'] - memory['alias_bytes']) > 0
    # Text-only cache: the prompt's visual tokens are in concat's cache only.
    assert rows['batch_8']['cache_long']['kv_cache_bytes'] == 8 * rows['batch_1'][
        'cache_long']['kv_cache_bytes']
  lavi, concat = measured['viln'], measured['concat']
  assert lavi['batch_1']['cache_long']['kv_cache_bytes'] < concat['batch_1']['cache_long'][
      'kv_cache_bytes']
  # bfloat16 beside float32 (tiny: float32): half the cache, and a decode program whose
  # parameters and cache take half the bytes.
  bf16 = measured['viln_bfloat16']
  for batch in BATCHES:
    assert bf16[batch]['cache_long']['kv_cache_bytes'] * 2 == lavi[batch]['cache_long'][
        'kv_cache_bytes']
    assert (bf16[batch]['memory']['decode']['argument_bytes'] <
            0.55 * lavi[batch]['memory']['decode']['argument_bytes'])
  ratios = measured['lavi_over_concat']
  for batch in BATCHES:
    for k in LATENCIES:
      assert ratios[batch][k] == pytest.approx(lavi[batch][k] / concat[batch][k])
    for n in ('short', 'long'):
      assert ratios[batch][f'cache_{n}_bytes'] == pytest.approx(
          lavi[batch][f'cache_{n}']['total_bytes'] / concat[batch][f'cache_{n}']['total_bytes'])
    for program in ('prefill', 'decode'):
      assert ratios[batch][f'{program}_memory_bytes'] == pytest.approx(
          lavi[batch]['memory'][program]['total_bytes'] /
          concat[batch]['memory'][program]['total_bytes'])
  assert ratios['peak_rss_bytes'] == pytest.approx(lavi['peak_rss_bytes'] /
                                                   concat['peak_rss_bytes'])


def test_hugging_face_comparison(report):
  hf, measured = report['hf'], report['measured']
  assert hf['model'] == 'LlavaOnevisionForConditionalGeneration'
  side = _grid_side()  # base + grid crop, a newline per row
  assert hf['visual_tokens_per_image'] == 2 * side ** 2 + side
  assert hf['peak_rss_bytes'] >= hf['baseline_rss_bytes'] > 0
  for batch in BATCHES:
    assert all(hf[batch][k] > 0 for k in LATENCIES)
    for fusion in ('viln', 'concat'):
      for k in LATENCIES:
        assert hf['speedup'][fusion][batch][k] == pytest.approx(
            hf[batch][k] / measured[fusion][batch][k])


def test_accelerator_and_targets(report):
  accelerator = report['accelerator']
  assert accelerator['status'] == 'not measured: CPU'
  assert set(bench_accelerator.NOT_MEASURED) <= set(accelerator)
  assert all(accelerator[k] is None for k in bench_accelerator.NOT_MEASURED)
  targets, ratios = report['targets'], report['measured']['lavi_over_concat']
  for batch in BATCHES:
    assert targets['ttft_lavi_over_concat'][batch] == ratios[batch]['ttft_s']
    assert targets['cache_lavi_over_concat'][batch] == ratios[batch]['cache_short_bytes']
    assert (targets['e2e_short_speedup_over_hf'][batch] ==
            report['hf']['speedup']['viln'][batch]['e2e_short_s'])
  assert all(isinstance(t['met'], bool) for t in targets.values())


def test_accelerator_figures_from_a_measured_step():
  model, run = bench_latency.measured_model(True), bench_latency.settings(True)
  cache = dict(kv_cache_bytes=1000, visual_memory_bytes=500, total_bytes=1500)
  lavi = dict(batch_1=dict(decode_s_per_token=0.01, cache_long=cache))
  out = bench_accelerator.measure(model, dict(run, repeats=1), lavi, peak_flops=1e12,
                                  bandwidth=1e10)
  assert out['decode_tokens_per_s'] == pytest.approx(100)
  params = bench_latency.random_params(model)
  llm_bytes = bench_latency.nbytes({k: v for k, v in params.items()
                                    if k not in ('vit', 'projector', 'frame_index')})
  # attn and mlp norms of every layer (and the final norm) read the one visual K/V
  norms = 2 * model.llm.num_layers + ('final' in model.viln.sublayers)
  assert out['bandwidth_bound_tokens_per_s'] == pytest.approx(
      1e10 / (llm_bytes + 1000 + 500 * norms))
  assert out['fraction_of_bound'] == pytest.approx(100 / out['bandwidth_bound_tokens_per_s'])
  assert out['train_step_s'] > 0 and 0 < out['train_step_mfu'] < 1
