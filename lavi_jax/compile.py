"""Ahead-of-time TPU compile check: per-chip HBM, FLOPs and compile time of the real train step
of each stage (and optionally of the generation programs) for a named TPU slice, compiled by
libtpu on any machine, no TPU needed (DESIGN.md section 7).

  python -m lavi_jax.compile --config=configs/7b.py --topology=v5p-64 [--stages=finetune]
  python -m lavi_jax.compile --config=configs/7b.py --topology=v5e:16x16 --num_slices=2 \\
      --config.mesh.num_slices=2 --json=report.json

Peak HBM per chip = arguments + outputs - aliased (donated) + temporaries + generated code, all
from `memory_analysis()`. Exits with status 1 (a message, no traceback) when a program does not
fit its chip, does not compile, or the config does not suit the mesh.

FLOPs: `cost_analysis()` counts a loop body once (the scanned LLM layers, the chunked loss, the
accumulated micro-batches), so the whole step's FLOPs are read from the optimised program itself
(`lavi_jax.compiled_cost`: every dot and convolution, loops times their trip counts) and set
beside the trainer's analytic FLOPs for MFU, without and with the forward work that remat='full'
recomputes. Attention kernels (splash on TPU) are left out of the count, and their calls counted
(--config.model.attention=xla compiles einsum attention instead). The compiler's time estimate
('optimal_seconds') is reported as compiled (loop bodies once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from ml_collections import config_flags

from lavi_jax import compiled_cost
from lavi_jax import config as lavi_config
from lavi_jax import sharding
from lavi_jax.data import pipeline
from lavi_jax.inference import decode, serving
from lavi_jax.models import abstract_params
from lavi_jax.train import flops as flops_lib
from lavi_jax.train import loop
from lavi_jax.train import optimizer as opt_lib

HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
# Slice-name prefix -> (generation, TensorCores per chip counted in the name, smallest slice).
SLICES = {'v4': ('v4', 2, (2, 2, 1)), 'v5p': ('v5p', 2, (2, 2, 1)), 'v5e': ('v5e', 1, (1, 1)),
          'v5litepod': ('v5e', 1, (1, 1)), 'v6e': ('v6e', 1, (1, 1))}
GENERATION_NEW_TOKENS = 256  # answer length of the generation programs (eval.max_new_tokens: 0)
GENERATION_PROMPT_LEN = 64  # text tokens of their prompts (beside one image)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/7b.py', 'Run config file.')
_TOPOLOGY = flags.DEFINE_string('topology', 'v5p-64',
                                'Cloud TPU slice (v4-32, v5p-64, v5e-256, v5litepod-256, v6e-64) '
                                'or topology name (v5p:2x4x4, v5e:16x16, v6e:8x8, v4:2x2x4).')
_NUM_SLICES = flags.DEFINE_integer('num_slices', 1, 'Slices of a multi-slice job (must equal '
                                   'config.mesh.num_slices).')
_STAGES = flags.DEFINE_list('stages', None, 'Stages to compile (default: train.stage_order).')
_GENERATION = flags.DEFINE_bool('generation', False, 'Also compile the generation prefill and '
                                'decode programs for --serving_topology.')
_SERVING_TOPOLOGY = flags.DEFINE_string('serving_topology', '', 'Slice the generation programs '
                                        'are compiled for (default: one chip of --topology), '
                                        'e.g. v6e-1, v5e-4.')
_SERVING_MESH = flags.DEFINE_string('serving_mesh', '1,1,-1', 'DATA,FSDP,TENSOR mesh of the '
                                    'generation programs (as the generate command\'s --mesh).')
_SERVING_DTYPE = flags.DEFINE_enum('serving_dtype', 'bfloat16', lavi_config.DTYPES,
                                   'Parameters and computation of the generation programs.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', 0.0, 'HBM per chip in GiB (0: the generation\'s).')
_JSON = flags.DEFINE_string('json', None, 'Write the report (one dict per program) here.')


class CheckFailed(Exception):
  """The check's verdict: a program does not fit or does not compile (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # libtpu topology name, e.g. 'v5p:2x4x4'
  generation: str  # 'v4', 'v5e', 'v5p' or 'v6e'
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(int(d) for d in self.name.split(':')[1].split('x'))

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def hbm_bytes(self) -> int:
    return HBM_GIB[self.generation] * 2**30


def _slice_shape(smallest: tuple[int, ...], chips: int) -> tuple[int, ...]:
  """The standard shape of a slice of `chips` chips: from the smallest slice, the smallest
  dimension (the last among equals) doubles until the chips are reached."""
  dims = list(smallest)
  while math.prod(dims) < chips:
    i = min(range(len(dims)), key=lambda i: (dims[i], -i))
    dims[i] *= 2
  if math.prod(dims) != chips:
    raise ValueError(f'{chips} chips is not a standard slice size')
  return tuple(dims)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """'v5p-64' (v4/v5p names count TensorCores, 2 per chip; v5e/v6e names count chips) or a
  topology name 'v5p:2x4x4' -> Topology."""
  match = re.fullmatch(r'(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)', name)
  if match:
    generation, shape = match.groups()
    dims = len(SLICES[generation][2])
    if len(shape.split('x')) != dims:
      raise ValueError(f'--topology={name}: {generation} topologies have {dims} dimensions')
    return Topology(name, generation, num_slices)
  match = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name)
  if not match:
    raise ValueError(f'--topology={name}: expected a slice name like v5p-64 or v5e-256, or a '
                     f'topology name like v5p:2x4x4 or v5e:16x16')
  generation, cores, smallest = SLICES[match[1]]
  count = int(match[2])
  if count % cores:
    raise ValueError(f'--topology={name}: {match[1]} slice names count TensorCores ({cores} per '
                     f'chip), so the number must be even')
  try:
    shape = _slice_shape(smallest, count // cores)
  except ValueError as e:
    raise ValueError(f'--topology={name}: {e}; give the topology name instead '
                     f'(e.g. {generation}:{"x".join(["4"] * len(smallest))})') from e
  return Topology(f'{generation}:{"x".join(map(str, shape))}', generation, num_slices)


def topology_devices(topology: Topology) -> list:
  """The topology's compile-only TPU devices (all slices)."""
  # Only compiles: several processes (tests, a running job) may hold libtpu at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # v4 and v5p chips hold two TensorCores: one device per chip ('megacore'), as on a pod.
  chip = dict(chip_config_name='megacore') if topology.generation in ('v4', 'v5p') else {}
  return topologies.get_topology_desc(topology_name=topology.name, platform='tpu',
                                      num_slices=topology.num_slices, **chip).devices


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-chip bytes of a compiled program and its peak (see the module docstring)."""
  m = compiled.memory_analysis()
  out = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
             alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
             generated_code_bytes=m.generated_code_size_in_bytes)
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] +
                       out['temp_bytes'] + out['generated_code_bytes'])
  return out


def _cost(compiled: jax.stages.Compiled) -> tuple[float, float | None, float | None]:
  """(FLOPs, the compiler's seconds estimate or None, bytes accessed in every memory space or
  None) per chip, loop bodies counted once."""
  cost = compiled.cost_analysis()
  return cost.get('flops', 0.0), cost.get('optimal_seconds'), cost.get('bytes accessed')


def _abstract_batch(config: ml_collections.ConfigDict, global_batch: int, mesh) -> dict[str, Any]:
  """The global batch's ShapeDtypeStructs (frame-pool groups as the trainer's data makes them):
  entries whose leading axis (rows or groups) splits over (data, fsdp) are split so, any others
  replicated."""
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH)
  split, replicated = sharding.data_sharding(mesh), NamedSharding(mesh, PartitionSpec())

  def place(x):
    s = split if x.shape and x.shape[0] % shards == 0 else replicated
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  spec = pipeline.batch_spec(config, global_batch, pipeline.visual_groups(config, shards))
  return jax.tree.map(place, spec)


def _compile_step(config: ml_collections.ConfigDict, stage: opt_lib.Stage, mesh, batch):
  """(compiled train step, its abstract state, lower + compile seconds); raises CheckFailed."""
  start = time.perf_counter()
  step, state = loop.jit_train_step(config, stage, mesh, loop.make_param_shardings(config, mesh))
  try:
    with sharding.activate(mesh, config.mesh):
      compiled = step.lower(state, batch).compile()
  except (jax.errors.JaxRuntimeError, ValueError) as e:
    raise CheckFailed(_compile_failure(f'stage {stage.name}: the train step', e)) from e
  return compiled, state, time.perf_counter() - start


def _compile_failure(what: str, error: Exception) -> str:
  first_line = str(error).strip().splitlines()[0]
  if 'RESOURCE_EXHAUSTED' in first_line:
    return (f'{what} does not fit in HBM: {first_line} Lower data.per_device_batch_size (or '
            f'data.batch_size) and raise train.accumulation_steps to keep the global batch, '
            f'or shard more (config.mesh).')
  return f'{what} does not compile: {type(error).__name__}: {first_line}'


def stage_report(config: ml_collections.ConfigDict, stage: opt_lib.Stage, mesh, global_batch: int,
                 topology: Topology, hbm_bytes: int) -> tuple[jax.stages.Compiled, dict]:
  """(the compiled train step of `stage`, its report) on `mesh`."""
  batch = _abstract_batch(config, global_batch, mesh)
  compiled, state, seconds = _compile_step(config, stage, mesh, batch)
  dims = loop.flops_dims(batch)
  analytic = loop.analytic_step_flops(config, stage, state.params, batch)
  recomputed = flops_lib.recomputed_forward_flops(config.model,
                                                  loop.vit_trained(state.params, stage), **dims)
  with_remat = None if recomputed is None else analytic + recomputed
  per_chip, kernel_calls = compiled_cost.count(compiled.as_text())
  compiled_flops = per_chip * topology.num_chips
  as_compiled, compiler_as_compiled, _ = _cost(compiled)
  report = dict(
      program='train_step', stage=stage.name, topology=topology.name,
      num_slices=topology.num_slices, chips=topology.num_chips,
      mesh=dict(mesh.shape), global_batch=global_batch, text_len=dims['text_len'],
      **memory(compiled), hbm_bytes=hbm_bytes,
      flops_per_chip_as_compiled=as_compiled, compiler_seconds_as_compiled=compiler_as_compiled,
      flops_per_chip=per_chip, kernel_calls_not_counted=kernel_calls, flops=compiled_flops,
      analytic_flops=analytic, attention=config.model.attention,
      analytic_flops_with_remat=with_remat, remat=config.model.remat,
      flops_over_analytic=_ratio(compiled_flops, analytic),
      flops_over_analytic_with_remat=_ratio(compiled_flops, with_remat),
      compile_seconds=seconds)
  report['fits'] = report['peak_bytes'] <= hbm_bytes
  return compiled, report


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a / b


def generation_reports(config: ml_collections.ConfigDict, topology: Topology, devices: list,
                       placement_flags: tuple[str, str | None], hbm_bytes: int
                       ) -> list[tuple[jax.stages.Compiled, dict]]:
  """(compiled program, report) of greedy generation on `devices` (a serving slice): prefill and
  decode of eval.batch_size requests, each one image of the data config's most crops (AnyRes,
  and a video of its frames when the data has videos) and GENERATION_PROMPT_LEN text tokens,
  answers of eval.max_new_tokens (else GENERATION_NEW_TOKENS); and decode at batch 1 when the
  mesh does not split rows.

  The model is laid out as `Generator.load(..., mesh, dtype)` lays it out (`placement_flags`),
  with its layers unrolled. A decode program's HBM bytes per chip (`compiled_cost.hbm_bytes`:
  the token loop, whose length depends on the answers, once, so one token's step) are set beside
  what that step must read at least once: the program's arguments (the chip's parameters, KV
  cache and visual memory); `cost_analysis()`'s bytes accessed in every memory space are
  reported beside them.
  """
  try:
    placement = serving.Placement.from_flags(*placement_flags, devices=devices)
    model = placement.model(config.model)
  except ValueError as e:
    raise CheckFailed(f'generation: --serving_mesh: {e}') from e
  model.scan_layers = model.vision.scan_layers = False
  params = placement.abstract_params(model)
  example = pipeline.example_spec(config)
  new_tokens = config.eval.max_new_tokens or GENERATION_NEW_TOKENS
  split = NamedSharding(placement.mesh, PartitionSpec(sharding.BATCH))
  replicated = NamedSharding(placement.mesh, PartitionSpec())
  batches = [placement.rows(config.eval.batch_size)] + [1] * (placement.batch_shards == 1)
  reports = []
  for b in batches:
    place = lambda shape, dtype: jax.ShapeDtypeStruct(  # pylint: disable=cell-var-from-loop
        shape, dtype, sharding=split if b > 1 else replicated)
    pixels = lambda frames: dict(pixel_values=place(  # pylint: disable=cell-var-from-loop
        (b, frames, example.image_size, example.image_size, 3), np.uint8))
    videos = pixels(example.num_frames) if example.num_frames else None
    inputs = (place((b, GENERATION_PROMPT_LEN), np.int32),
              place((b, GENERATION_PROMPT_LEN), np.bool_), pixels(example.image_frames), videos)
    start = time.perf_counter()
    try:
      programs = decode.programs(model, params, *inputs, max_new_tokens=new_tokens,
                                 placement=placement)
      named = zip(('prefill', 'decode'), programs) if b > 1 else [('decode@1', programs[1])]
      for name, lowered in named:
        compiled = lowered.compile()
        flops, seconds, accessed = _cost(compiled)
        report = dict(
            program=name, stage='generation', topology=topology.name, chips=len(devices),
            mesh=dict(placement.mesh.shape), dtype=model.dtype, batch=b,
            prompt_len=GENERATION_PROMPT_LEN, new_tokens=new_tokens, **memory(compiled),
            hbm_bytes=hbm_bytes, flops_per_chip_as_compiled=flops,
            compiler_seconds_as_compiled=seconds, compile_seconds=time.perf_counter() - start)
        report['fits'] = report['peak_bytes'] <= hbm_bytes
        if name != 'prefill':
          report['bytes_accessed_per_token'] = accessed
          report['hbm_bytes_per_token'] = compiled_cost.hbm_bytes(compiled.as_text())
          report['hbm_bytes_over_arguments'] = _ratio(report['hbm_bytes_per_token'],
                                                      report['argument_bytes'])
        reports.append((compiled, report))
        start = time.perf_counter()
    except (jax.errors.JaxRuntimeError, ValueError) as e:
      raise CheckFailed(_compile_failure('generation', e)) from e
  return reports


def check(config: ml_collections.ConfigDict, topology: Topology, stages: list[str] | None = None,
          generation: bool = False, hbm_bytes: int | None = None,
          serving_topology: Topology | None = None,
          serving_placement: tuple[str, str | None] = ('1,1,-1', 'bfloat16')):
  """Compiles every selected stage's train step (default: all; [] for none) for `topology`,
  and with `generation` the generation programs for `serving_topology` (default: one chip of
  `topology`) laid out by `serving_placement` ((mesh, dtype) as `Generator.load` takes them).

  Returns [(compiled program, report dict)], one per program; a stage that does not compile
  gives (None, its identification with `error`, the message, and fits=False). Raises
  lavi_jax.config.ConfigError or ValueError for a config that does not suit the topology,
  CheckFailed for generation programs that do not compile.
  """
  if config.mesh.num_slices != topology.num_slices:
    raise lavi_config.ConfigError(
        f'config.mesh.num_slices: is {config.mesh.num_slices}, but the topology has '
        f'{topology.num_slices} slice(s) (--num_slices)')
  lavi_config.validate_model(config.model)
  all_stages = opt_lib.stages(config.train)
  names = [s.name for s in all_stages] if stages is None else stages
  unknown = sorted(set(names) - {s.name for s in all_stages})
  if unknown:
    raise lavi_config.ConfigError(f'config.train.stage_order: has no stage {unknown} '
                                  f'(--stages); it has {[s.name for s in all_stages]}')
  devices = topology_devices(topology)
  train_hbm = hbm_bytes or topology.hbm_bytes
  mesh = sharding.make_mesh(config.mesh, devices)
  global_batch = lavi_config.global_batch_size(config, len(devices))
  out = []
  for stage in (s for s in all_stages if s.name in names):
    try:
      out.append(stage_report(config, stage, mesh, global_batch, topology, train_hbm))
    except CheckFailed as e:
      out.append((None, dict(program='train_step', stage=stage.name, topology=topology.name,
                             num_slices=topology.num_slices, chips=topology.num_chips,
                             mesh=dict(mesh.shape), global_batch=global_batch,
                             hbm_bytes=train_hbm, fits=False, error=str(e))))
  if generation:
    serving_devices = topology_devices(serving_topology) if serving_topology else devices[:1]
    serving_topology = serving_topology or topology
    out += generation_reports(config, serving_topology, serving_devices, serving_placement,
                              hbm_bytes or serving_topology.hbm_bytes)
  return out


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f}'


def _maybe(value: float | None, style: str = 'f') -> str:
  return '-' if value is None else f'{value:.3{style}}'


def format_table(reports: list[dict]) -> str:
  """Memory (GiB per chip) and FLOPs (whole step, all chips) of each program."""
  lines = [f'{"program":<22}{"args":>8}{"out":>8}{"alias":>8}{"temp":>8}{"code":>7}{"peak":>8}'
           f'{"HBM":>7}  fits', '-' * 82]
  for r in reports:
    name = f'{r["stage"]}/{r["program"]}' if r['program'] != 'train_step' else r['stage']
    if 'error' in r:
      lines.append(f'{name:<22}{"does not compile (see below)":>52}{_gib(r["hbm_bytes"]):>8}  NO')
      continue
    lines.append(f'{name:<22}{_gib(r["argument_bytes"]):>8}{_gib(r["output_bytes"]):>8}'
                 f'{_gib(r["alias_bytes"]):>8}{_gib(r["temp_bytes"]):>8}'
                 f'{_gib(r["generated_code_bytes"]):>7}{_gib(r["peak_bytes"]):>8}'
                 f'{_gib(r["hbm_bytes"]):>7}  {"yes" if r["fits"] else "NO"}')
  lines += ['', f'{"FLOPs (all chips)":<22}{"compiled":>12}{"analytic":>11}{"+remat":>11}'
            f'{"ratio":>7}{"ratio+remat":>12}{"kernels":>9}{"compile s":>10}', '-' * 94]
  for r in reports:
    if r['program'] != 'train_step' or 'error' in r:
      continue
    lines.append(f'{r["stage"]:<22}{_maybe(r["flops"], "e"):>12}'
                 f'{_maybe(r["analytic_flops"], "e"):>11}'
                 f'{_maybe(r["analytic_flops_with_remat"], "e"):>11}'
                 f'{_maybe(r["flops_over_analytic"]):>7}'
                 f'{_maybe(r["flops_over_analytic_with_remat"]):>12}'
                 f'{r["kernel_calls_not_counted"]:>9}{r["compile_seconds"]:>10.0f}')
  decodes = [r for r in reports if r.get('hbm_bytes_per_token') is not None]
  if decodes:
    lines += ['', f'{"decode, per token":<22}{"HBM":>8}{"arguments":>11}{"ratio":>7}'
              f'{"all spaces":>12}{"batch":>7}', '-' * 67]
    lines += [f'{r["stage"]}/{r["program"]:<11}{_gib(r["hbm_bytes_per_token"]):>8}'
              f'{_gib(r["argument_bytes"]):>11}{_maybe(r["hbm_bytes_over_arguments"]):>7}'
              f'{"-" if r["bytes_accessed_per_token"] is None else _gib(r["bytes_accessed_per_token"]):>12}'
              f'{r["batch"]:>7}' for r in decodes]
  return '\n'.join(lines)


def too_big(reports: list[dict]) -> str | None:
  """The message for the programs that do not fit their chip or do not compile, or None."""
  bad = [r for r in reports if not r['fits']]
  return '\n'.join(r['error'] if 'error' in r else _not_fitting(r) for r in bad) or None


def _not_fitting(report: dict) -> str:
  return (f'{_title(report)} does not fit: it needs {_gib(report["peak_bytes"])} GiB '
          f'({report["peak_bytes"]:,} bytes) of HBM per chip, the chip has '
          f'{_gib(report["hbm_bytes"])} GiB ({report["hbm_bytes"]:,} bytes).')


def _title(report: dict) -> str:
  if report['program'] == 'train_step':
    return f'stage {report["stage"]}: the train step'
  return f'generation: the {report["program"]} program'


def main(argv):
  del argv
  config = _CONFIG.value
  try:
    topology = parse_topology(_TOPOLOGY.value, _NUM_SLICES.value)
    serving_topology = parse_topology(_SERVING_TOPOLOGY.value) if _SERVING_TOPOLOGY.value else None
    results = check(config, topology, _STAGES.value, _GENERATION.value,
                    int(_HBM_GIB.value * 2**30) or None, serving_topology,
                    (_SERVING_MESH.value, _SERVING_DTYPE.value))
  except (CheckFailed, ValueError) as e:  # ConfigError is a ValueError
    sys.exit(str(e))
  reports = [r for _, r in results]
  trains = [r for r in reports if r['program'] == 'train_step']
  if trains:
    print(f'{config.model.llm.num_layers}-layer LLM, fusion {config.model.fusion}, remat '
          f'{config.model.remat} on {topology.name} x {topology.num_slices} slice(s) = '
          f'{topology.num_chips} chips, mesh {trains[0]["mesh"]}, global batch '
          f'{trains[0]["global_batch"]}; GiB per chip')
  generations = [r for r in reports if r['stage'] == 'generation']
  if generations:
    g = generations[0]
    print(f'Generation on {g["topology"]} ({g["chips"]} chip(s)), mesh {g["mesh"]}, {g["dtype"]}: '
          f'{GENERATION_PROMPT_LEN} text tokens and one image per prompt, {g["new_tokens"]} new '
          'tokens, layers unrolled (decode bytes: one token\'s step; arguments: the parameters, '
          'KV cache and visual memory a chip holds); GiB per chip')
  print(format_table(reports))
  if _JSON.value:
    with open(_JSON.value, 'w', encoding='utf-8') as f:
      json.dump(reports, f, indent=2)
  message = too_big(reports)
  if message:
    sys.exit(message)


if __name__ == '__main__':
  app.run(main)
