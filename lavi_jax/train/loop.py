"""The training loop: stages, sharded steps, metrics, checkpoints, resume, clean preemption.

A run restarted with the same workdir resumes from its latest intact checkpoint exactly (train
state and data iterator; see `train.checkpoint` for the checksums). SIGTERM, or a TPU preemption
notice, on any host stops every host at the same step: all save that step and exit cleanly. A
non-finite loss stops the run before anything is saved after it (the loss is replicated, so
every host sees it at the same step).
"""

from __future__ import annotations

import functools
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lavi_jax import config as lavi_config
from lavi_jax import sharding
from lavi_jax.convert import from_hf
from lavi_jax.data import pipeline
from lavi_jax.data.errors import DataError
from lavi_jax.models import abstract_params, init_params
from lavi_jax.train import checkpoint as ckpt_lib
from lavi_jax.train import flops as flops_lib
from lavi_jax.train import lora as lora_lib
from lavi_jax.train import optimizer as opt_lib
from lavi_jax.train import state as state_lib
from lavi_jax.train import step as step_lib
from lavi_jax.train.metrics import MetricsWriter


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or infinite; the run stopped without saving past the last good step."""


class _StopRequest:
  """Whether to stop at a step boundary: the same answer on every process, so that all save the
  same step and exit.

  One process: SIGTERM sets a flag. Several: JAX's preemption sync service (started by
  `jax.distributed.initialize`) catches SIGTERM, the preemption notice, on any host and picks the
  next step that every host reaches; `reached_preemption_sync_point` is a local check, no
  collective, so this costs nothing per step. Without the service
  (`jax_enable_preemption_service=False`) the hosts pool their SIGTERM flags with an all-gather
  at every step boundary instead (a host sync per step).
  """

  def __init__(self):
    self.signalled = False
    self._service = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
    # The service installs its own SIGTERM handler, which a Python handler would replace.
    self._previous = None if self._service else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and exiting.')
    self.signalled = True

  def agreed(self, step: int) -> bool:
    """Whether every process stops after `step` (call it at every step boundary)."""
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self.signalled
    return bool(np.any(multihost_utils.process_allgather(np.array(self.signalled))))

  def restore(self):
    if not self._service:
      signal.signal(signal.SIGTERM, self._previous)


def global_batch(local_batch: dict[str, Any], mesh) -> dict[str, Any]:
  """Host-local numpy batch -> global jax.Arrays with the batch axis over (data, fsdp)."""
  data_sharding = sharding.data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x),
                      local_batch)


def make_param_shardings(config: ml_collections.ConfigDict, mesh):
  """NamedShardings of the model's parameters on `mesh` under the configured rules."""
  abstract = jax.eval_shape(functools.partial(init_params, config.model), jax.random.key(0))
  return sharding.logical_shardings(abstract, mesh, sharding.rules(config.mesh))


def jit_train_step(config: ml_collections.ConfigDict, stage: opt_lib.Stage, mesh,
                   param_shardings) -> tuple[Callable, state_lib.TrainState]:
  """(the jitted train step of `stage`, state donated; the abstract sharded state it takes)."""
  abstract, shardings = state_lib.state_shardings(config, stage, mesh, param_shardings)
  trainable, _ = opt_lib.split(abstract.params, lora_lib.trainable_regex(stage.config))
  tx = opt_lib.make_optimizer(stage, config.train, trainable)
  replicated = NamedSharding(mesh, PartitionSpec())
  step = jax.jit(step_lib.make_train_step(config, stage, tx), donate_argnums=0,
                 out_shardings=(shardings, replicated))
  return step, abstract


def flops_dims(batch, work: dict[str, Any] | None = None) -> dict[str, Any]:
  """What the analytic FLOPs (`train.flops.forward_flops`) of a global batch (arrays or shapes)
  depend on: rows, text_len and the visual work. A frame-pool batch counts every slot, or with
  `work` (the step's `vision_frames` and `visual_tokens` metrics) only those that hold
  something; padded images / videos count their frames per row."""
  b, t = batch['input_ids'].shape
  dims = dict(batch=b, text_len=t)
  if 'visual' in batch:
    groups, slots = batch['visual']['frame_index'].shape
    tokens = batch['visual']['token_source'].shape[1]
    if work is not None:
      slots, tokens = float(work['vision_frames']) / groups, float(work['visual_tokens']) / b
    dims.update(vit_passes=groups * slots, visual_tokens=tokens)
  else:
    for key, kind in (('image_frames', 'images'), ('video_frames', 'videos')):
      dims[key] = batch[kind]['pixel_values'].shape[1] if kind in batch else 0
  return dims


def analytic_step_flops(config: ml_collections.ConfigDict, stage: opt_lib.Stage, params,
                        batch, work: dict[str, Any] | None = None) -> float:
  """Analytic FLOPs of a train step of `stage` on a global batch (see `flops_dims`); `params`
  may be abstract."""
  forward = flops_lib.forward_flops(config.model, **flops_dims(batch, work))
  return flops_lib.train_step_flops(forward, vit_trained(params, stage),
                                    llm_trained(params, stage))


def _trained_paths(params, stage: opt_lib.Stage) -> list[str]:
  """Paths `stage` trains; a LoRA adapter counts as its target's path (the step forms the
  target's full weight gradient, lavi_jax.train.lora)."""
  trainable, _ = opt_lib.split(params, lora_lib.trainable_regex(stage.config))
  return [k.removeprefix(lora_lib.ROOT + '/') for k in trainable]


def vit_trained(params, stage: opt_lib.Stage) -> bool:
  """Whether `stage` trains any ViT parameter."""
  return any(k.startswith('vit/') for k in _trained_paths(params, stage))


def llm_trained(params, stage: opt_lib.Stage) -> bool:
  """Whether `stage` trains any of the LLM's own matrices (its conditioners aside)."""
  return any(k.startswith('llm/') and '/conditioner/' not in k and k.endswith(('kernel',
                                                                            'embedding'))
             for k in _trained_paths(params, stage))


def _initial_params(config: ml_collections.ConfigDict, param_shardings):
  """Parameters from `config.init_from`, restored sharded: a convert.from_hf output, or a
  training workdir's latest checkpoint (a LoRA stage's with its adapters merged)."""
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(config.model), param_shardings)
  where = f'init_from={config.init_from}'
  if from_hf.checkpoint_kind(config.init_from) == 'workdir':
    run, state = ckpt_lib.find_checkpoint(config.init_from)
    ckpt_lib.check_model_config(run.model, config.model, where)
    return ckpt_lib.read_params(run, state, abstract)
  stored_model, params = from_hf.load_converted(config.init_from, abstract)
  ckpt_lib.check_model_config(stored_model, config.model, where)
  return params


class Trainer:
  """Owns the mesh, state, data iterator and checkpointer of one run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    lavi_config.validate(config)
    self.mesh = sharding.make_mesh(config.mesh)
    self.benchmarks = _periodic_eval(config, self.mesh)  # before anything slow: checks data files
    self.config = config
    self.workdir = workdir
    self.stages = opt_lib.stages(config.train)
    self.total_steps = self.stages[-1].end
    self.checkpointer = ckpt_lib.Checkpointer(workdir, config)
    data, fsdp, _ = sharding.resolve_mesh_shape(config.mesh)
    local_shards = max(data * fsdp // jax.process_count(), 1)
    self.data = iter(pipeline.make_dataset(
        config, 'train', process_index=jax.process_index(), process_count=jax.process_count(),
        groups=pipeline.visual_groups(config, local_shards)))
    self.param_shardings = make_param_shardings(config, self.mesh)
    self.state, self.optimizer_stage = self._initial_state()
    self.writer = MetricsWriter(workdir)
    self._compiled: dict[int, Callable] = {}

  def _initial_state(self):
    latest = self.checkpointer.latest_intact_step()
    if latest is not None:
      stage = opt_lib.stage_at(self.config.train, max(latest - 1, 0)) or self.stages[-1]
      abstract, _ = state_lib.state_shardings(self.config, stage, self.mesh,
                                              self.param_shardings)
      logging.info('Resuming from step %d (stage %s).', latest, stage.name)
      return self.checkpointer.restore(latest, abstract, self.data), stage
    params = _initial_params(self.config, self.param_shardings) if self.config.init_from else None
    state, _ = state_lib.create(self.config, self.stages[0], self.mesh,
                                jax.random.key(self.config.seed), params)
    return state, self.stages[0]

  def _step_fn(self, stage: opt_lib.Stage):
    if stage.index not in self._compiled:
      self._compiled[stage.index], _ = jit_train_step(self.config, stage, self.mesh,
                                                      self.param_shardings)
    return self._compiled[stage.index]

  def _save(self, step: int, force: bool = False):
    self.checkpointer.save(step, self.state, self.data, force=force)

  def run(self) -> int:
    """Trains until the last stage ends (or a stop all processes agree on: SIGTERM, preemption).
    Returns the final step."""
    stop, stopped = _StopRequest(), False
    step = int(self.state.step)
    progress = tqdm.tqdm(total=self.total_steps, initial=step, desc='train', unit='step',
                         disable=jax.process_index() != 0)
    peak = flops_lib.peak_flops_per_device(configured=self.config.train.peak_flops_per_device)
    try:
      while step < self.total_steps and not stopped:
        stage = opt_lib.stage_at(self.config.train, step)
        if stage.index != self.optimizer_stage.index:
          self.state = state_lib.with_stage_optimizer(self.state, self.config, stage, self.mesh,
                                                      self.param_shardings, self.optimizer_stage)
          self.optimizer_stage = stage
        step, stopped = self._run_stage(stage, step, stop, progress, peak)
      self.checkpointer.wait()
    finally:
      stop.restore()
      progress.close()
      self.writer.close()
    return step

  def _run_stage(self, stage, step, stop, progress, peak) -> tuple[int, bool]:
    """Trains `stage` from `step`; returns (the step reached, whether the run stops there)."""
    step_fn = self._step_fn(stage)
    pending, window_start, shapes = [], time.perf_counter(), None
    devices = jax.device_count()
    while step < stage.end:
      batch = global_batch(next(self.data), self.mesh)
      shapes = shapes or jax.eval_shape(lambda b: b, batch)
      with sharding.activate(self.mesh, self.config.mesh):
        self.state, metrics = step_fn(self.state, batch)
      pending.append(metrics)
      step += 1
      progress.update(1)
      end_of_stage = step == stage.end
      stopping = stop.agreed(step)
      save_now = end_of_stage or step % self.config.checkpoint.every == 0 or stopping
      eval_now = (self.benchmarks is not None and step % self.config.eval.every == 0
                  and not stopping)
      summary = None
      if step % self.config.train.log_every == 0 or save_now or eval_now:
        fetched = jax.device_get(pending)
        bad = [step - len(fetched) + i + 1 for i, m in enumerate(fetched)
               if not np.isfinite(m['loss'])]
        if bad:
          raise NonFiniteLoss(f'loss is {fetched[bad[0] - step + len(fetched) - 1]["loss"]} at '
                              f'step {bad[0]} (stage {stage.name}); nothing after the last '
                              f'checkpoint was saved. Lower the learning rate or check the data.')
        elapsed = time.perf_counter() - window_start
        flops = sum(analytic_step_flops(self.config, stage, self.state.params, shapes,
                                        m if 'vision_frames' in m else None) for m in fetched)
        summary = _summarise(fetched, elapsed, flops, devices, peak)
        summary['stage'] = stage.name
        progress.set_postfix(loss=f'{summary["loss"]:.3f}', acc=f'{summary["accuracy"]:.2f}')
        pending = []
      if save_now:
        self._save(step, force=stopping or end_of_stage)
      if eval_now:  # after the save, so a failing benchmark costs no training
        summary.update(self.benchmarks(self.state.params))
      if summary is not None:
        self.writer.write(step, summary)
        window_start = time.perf_counter()
      if stopping:
        return step, True
    return step, False


def _periodic_eval(config: ml_collections.ConfigDict, mesh) -> Callable[[Any], dict] | None:
  """config.eval: params -> {'eval/TASK/METRIC': headline value, 'eval/errors': tasks that
  failed}, or None when off. Raises FileNotFoundError naming the task when a data file is
  missing; a task that fails during training (bad record, unreadable file) is logged and
  counted, and training goes on."""
  if not (config.eval.tasks and config.eval.every > 0):
    return None
  if jax.process_count() > 1:
    logging.warning('Benchmarks during training run single-process only; skipped.')
    return None
  from lavi_jax.eval import datasets, runner, scoring, tasks  # pylint: disable=import-outside-toplevel
  from lavi_jax.inference.generator import Generator  # pylint: disable=import-outside-toplevel
  from lavi_jax.inference.serving import Placement  # pylint: disable=import-outside-toplevel
  selected = tasks.resolve(config.eval.tasks)
  for task in selected:
    try:
      datasets.find_data_file(config.eval.data_dir, task.data)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'config.eval.tasks: task {task.name}: {e}') from e
  try:
    reasoning_tags = scoring.parse_reasoning_tags(config.eval.reasoning_tags)
  except ValueError as e:
    raise lavi_config.ConfigError(f'config.eval.reasoning_tags: {e}') from e
  tokenizer = pipeline.make_tokenizer(config.data)
  # on the training mesh and its parameter layout, in the serving dtype
  placement = Placement(mesh, config.mesh.rules, config.eval.dtype or None)

  def run(params) -> dict[str, float]:
    generator = Generator(config.model, params, tokenizer, config.data.chat_template,
                          config.data, max_len=config.eval.max_len,
                          batch_size=config.eval.batch_size, placement=placement)
    outputs, errors = [], 0
    for task in selected:
      try:
        outputs += runner.evaluate(generator, [task], config.eval.data_dir, config.eval.limit,
                                   config.eval.max_new_tokens, reasoning_tags=reasoning_tags)
      except (DataError, OSError) as e:
        logging.warning('Benchmark %s failed; training goes on: %s', task.name, e)
        errors += 1
    return dict(runner.headline_metrics(outputs), **{'eval/errors': errors})

  return run


def _summarise(fetched: list[dict], elapsed: float, flops: float, devices: int,
               peak: float | None) -> dict[str, float]:
  """Averages over a log window of steps that did `flops` analytic FLOPs of real work, plus
  throughput: step time, tokens/s/device, TFLOP/s, MFU."""
  n = len(fetched)
  loss_tokens = sum(float(m['loss_tokens']) for m in fetched)
  out = {
      'loss': sum(float(m['loss']) * float(m['loss_tokens']) for m in fetched) / loss_tokens,
      'accuracy': sum(float(m['accuracy']) * float(m['loss_tokens']) for m in fetched) /
                  loss_tokens,
      'grad_norm': float(np.mean([m['grad_norm'] for m in fetched])),
      'learning_rate': float(fetched[-1]['learning_rate']),
      'step_time_s': elapsed / n,
      'tokens_per_s_per_device': sum(float(m['text_tokens']) for m in fetched) / elapsed /
                                 devices,
      'tflops_per_s_per_device': flops / elapsed / devices / 1e12,
  }
  if 'visual_slot_use' in fetched[0]:  # how full the frame pools were (data.frames_per_row)
    out['visual_slot_use'] = float(np.mean([m['visual_slot_use'] for m in fetched]))
  for counter in step_lib.DATA_COUNTERS:
    if counter in fetched[0]:
      out[counter] = int(sum(int(m[counter]) for m in fetched))
  if peak:
    out['mfu'] = out['tflops_per_s_per_device'] * 1e12 / peak
  return out

