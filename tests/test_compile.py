"""The ahead-of-time TPU compile check (lavi_jax.compile): libtpu compiles the tiny config's train
step for a 4-chip v5e slice; the report's memory is the compiler's, its FLOPs cover the whole
step, and a program that does not fit exits with status 1 naming it."""

import json
import subprocess
import sys

import pytest

from lavi_jax import compile as compile_lib
from lavi_jax import config as lavi_config
from lavi_jax.config import ConfigError
from tests.helpers import tiny_config

TOPOLOGY = 'v5e:2x2'
# Quick to compile: one ViT layer runs; the 4 LLM layers are scanned (cost_analysis counts the
# scan body once; the report counts every layer from the optimised program).
OVERRIDES = {'scan_layers': True, 'remat': 'full', 'vision.num_layers': 2}
CLI = [sys.executable, '-m', 'lavi_jax.compile', '--config=configs/tiny.py',
       f'--topology={TOPOLOGY}', '--config.model.scan_layers=True',
       '--config.model.vision.num_layers=2']
MEMORY_FIELDS = {'argument_bytes': 'argument_size_in_bytes', 'output_bytes': 'output_size_in_bytes',
                 'alias_bytes': 'alias_size_in_bytes', 'temp_bytes': 'temp_size_in_bytes',
                 'generated_code_bytes': 'generated_code_size_in_bytes'}
FIELDS = {'program', 'stage', 'topology', 'num_slices', 'chips', 'mesh', 'global_batch',
          'text_len', 'peak_bytes', 'hbm_bytes', 'fits', 'flops_per_chip_as_compiled',
          'compiler_seconds_as_compiled', 'flops_per_chip', 'kernel_calls_not_counted', 'attention',
          'flops', 'analytic_flops', 'analytic_flops_with_remat', 'remat', 'flops_over_analytic',
          'flops_over_analytic_with_remat', 'compile_seconds', *MEMORY_FIELDS}


@pytest.fixture(scope='module')
def checked():
  [(compiled, report)] = compile_lib.check(tiny_config(**OVERRIDES),
                                           compile_lib.parse_topology(TOPOLOGY))
  return compiled, report


@pytest.mark.parametrize('name,topology,chips,hbm_gib', [
    ('v5p-64', 'v5p:2x4x4', 32, 95), ('v4-32', 'v4:2x2x4', 16, 32), ('v4-8', 'v4:2x2x1', 4, 32),
    ('v5p-1024', 'v5p:8x8x8', 512, 95), ('v5e-256', 'v5e:16x16', 256, 16),
    ('v5litepod-256', 'v5e:16x16', 256, 16), ('v5e-8', 'v5e:2x4', 8, 16),
    ('v6e-64', 'v6e:8x8', 64, 32), ('v6e:4x4', 'v6e:4x4', 16, 32), ('v4:2x2x4', 'v4:2x2x4', 16, 32),
])
def test_topology_names(name, topology, chips, hbm_gib):
  parsed = compile_lib.parse_topology(name)
  assert (parsed.name, parsed.num_chips, parsed.hbm_bytes) == (topology, chips, hbm_gib * 2**30)
  assert compile_lib.parse_topology(name, num_slices=2).num_chips == 2 * chips


@pytest.mark.parametrize('name,chips', [('v4-32', 16), ('v5p-16', 8), ('v5e-8', 8), ('v6e-4', 4)])
def test_one_device_per_chip(name, chips):
  devices = compile_lib.topology_devices(compile_lib.parse_topology(name, num_slices=2))
  assert len(devices) == 2 * chips
  assert sorted({d.slice_index for d in devices}) == [0, 1]


@pytest.mark.parametrize('name', ['v5p-63', 'v5e-96', 'v7-8', 'v5p:2x4', 'v5e:4x4x4'])
def test_bad_topology_names(name):
  with pytest.raises(ValueError, match='--topology'):
    compile_lib.parse_topology(name)


def test_report_memory_is_the_compilers(checked):
  compiled, report = checked
  assert FIELDS <= set(report)
  assert all(report[k] is not None for k in FIELDS), report
  assert (report['chips'], report['mesh'], report['global_batch']) == (
      4, {'data': 1, 'fsdp': 4, 'tensor': 1}, 16)
  memory = compiled.memory_analysis()
  for field, attribute in MEMORY_FIELDS.items():
    assert report[field] == getattr(memory, attribute), field
  assert report['alias_bytes'] > 0  # the state is donated
  assert report['peak_bytes'] == (
      memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes +
      memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
  assert report['hbm_bytes'] == 16 * 2**30 and report['fits']


def test_flops_cover_every_scanned_layer(checked):
  _, report = checked
  # The scanned layer is counted once as compiled; the whole step has all four.
  assert report['flops_per_chip'] > 1.3 * report['flops_per_chip_as_compiled']
  assert report['flops'] == pytest.approx(4 * report['flops_per_chip'])
  assert report['analytic_flops_with_remat'] > report['analytic_flops']
  assert 0.95 < report['flops_over_analytic_with_remat'] < 1.05, report


def test_config_errors_name_the_key():
  config = tiny_config()
  config.data.batch_size = 6
  with pytest.raises(ConfigError, match='data.batch_size'):
    compile_lib.check(config, compile_lib.parse_topology(TOPOLOGY))
  with pytest.raises(ConfigError, match='num_slices'):
    compile_lib.check(tiny_config(), compile_lib.parse_topology(TOPOLOGY, num_slices=2))


def test_a_program_too_big_for_the_chip_exits_1(tmp_path):
  out = tmp_path / 'report.json'
  result = subprocess.run(CLI + ['--hbm_gib=0.001', '--generation', f'--json={out}'],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'stage train: the train step does not fit: it needs' in result.stderr
  assert 'generation: the prefill program does not fit' in result.stderr
  assert 'generation: the decode program does not fit' in result.stderr
  assert 'generation: the decode@1 program does not fit' in result.stderr
  assert 'Traceback' not in result.stderr
  assert result.stdout.count('  NO') == 4  # the table has the verdicts too
  reports = json.loads(out.read_text())
  assert [r['program'] for r in reports] == ['train_step', 'prefill', 'decode', 'decode@1']
  assert not any(r['fits'] for r in reports)
  assert all(r['hbm_bytes'] == int(0.001 * 2**30) for r in reports)


def test_a_compile_that_runs_out_of_hbm_exits_1():
  result = subprocess.run(CLI + ['--config.data.batch_size=1048576'],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'stage train: the train step does not fit in HBM: RESOURCE_EXHAUSTED' in result.stderr
  assert 'Traceback' not in result.stderr
  assert 'does not compile (see below)' in result.stdout  # the table still comes


def test_auto_attention_compiles_splash_kernels_for_tpu(checked):
  _, report = checked  # attention='auto', compiled for TPU: splash for the LLM and the ViT
  assert report['attention'] == 'auto' and report['kernel_calls_not_counted'] > 0


@pytest.mark.parametrize('attention', ['splash', 'xla'])
def test_concat_lowers_for_tpu_with_each_backend(attention):
  config = tiny_config(fusion='concat', attention=attention, **{'vision.num_layers': 1})
  [(_, report)] = compile_lib.check(config, compile_lib.parse_topology(TOPOLOGY))
  assert report['fits']
  assert (report['kernel_calls_not_counted'] > 0) == (attention == 'splash')
  if attention == 'xla':  # every matmul counted
    assert 0.95 < report['flops_over_analytic'] < 1.05, report


def test_a_frozen_llm_is_counted_without_weight_gradients():
  # Only the bridge trains (the align stage's parameters): the LLM's matmuls get activation
  # gradients (for the conditioners inside it) but no weight gradients.
  config = tiny_config()
  config.train.stages.train.trainable = lavi_config.ALIGN_PARAMS
  [(_, report)] = compile_lib.check(config, compile_lib.parse_topology(TOPOLOGY))
  assert report['remat'] == 'none' and 0.95 < report['flops_over_analytic'] < 1.05, report


def _generation(mesh: str, dtype: str, serving_topology: str | None = TOPOLOGY) -> dict[str, dict]:
  """The generation programs' reports by name (serving_topology None: one chip)."""
  results = compile_lib.check(
      tiny_config(), compile_lib.parse_topology(TOPOLOGY), stages=[], generation=True,
      serving_topology=serving_topology and compile_lib.parse_topology(serving_topology),
      serving_placement=(mesh, dtype))
  return {r['program']: r for _, r in results}


def test_generation_compiles_split_over_a_serving_slice():
  reports = _generation('2,1,2', 'bfloat16')  # rows over data, heads and MLP over tensor
  assert list(reports) == ['prefill', 'decode']  # rows are split: no batch-1 decode
  for r in reports.values():
    assert r['chips'] == 4 and r['mesh'] == {'data': 2, 'fsdp': 1, 'tensor': 2}, r
    assert r['dtype'] == 'bfloat16' and r['batch'] == 8 and r['fits']
  decode = reports['decode']  # reads the chip's parameters once per token, VMEM traffic aside
  assert 0.8 * decode['argument_bytes'] < decode['hbm_bytes_per_token'] < (
      decode['bytes_accessed_per_token'])


def test_bfloat16_serving_halves_what_a_decode_step_reads():
  f32 = _generation('1,1,1', 'float32', None)['decode@1']
  bf16 = _generation('1,1,1', 'bfloat16', None)['decode@1']
  assert 0.45 < bf16['argument_bytes'] / f32['argument_bytes'] < 0.55
  # (the tiny model's logits, sampling and norms stay float32)
  assert bf16['hbm_bytes_per_token'] < 0.75 * f32['hbm_bytes_per_token']


def test_a_serving_mesh_that_does_not_suit_the_model_is_named():
  with pytest.raises(compile_lib.CheckFailed, match='--serving_mesh: a tensor axis of 4'):
    _generation('1,1,-1', 'bfloat16')  # 4 chips over 2 KV heads
