"""Preflight of the main job: the config and what the run reads, checked before anything heavy
is built, every problem listed at once.

A config whose model the built-in synthetic demo data cannot drive (its tokenizer does not fit
the model's placeholder ids or vocabulary) is real-scale: it needs a converted starting
checkpoint (`init_from`), real data (`data.train_mixture`) and the LLM's tokenizer
(`data.tokenizer`); when one is unset, the message says how to make them.
"""

from __future__ import annotations

import pathlib

import ml_collections
from etils import epath

from lavi_jax import config as lavi_config
from lavi_jax.convert import from_hf
from lavi_jax.data import mixture, pipeline, synthetic
from lavi_jax.train import checkpoint as ckpt_lib
from lavi_jax.train import optimizer as opt_lib

# Hugging Face checkpoints with the shapes of the shipped configs, by (LLM width, layers).
HF_LLMS = {(3584, 28): 'Qwen/Qwen2-7B-Instruct', (896, 24): 'Qwen/Qwen2-0.5B-Instruct'}
HF_VISION = 'google/siglip-so400m-patch14-384'
# What a real-scale run reads, and the problem when it is unset.
REAL_SCALE_NEEDS = {
    'init_from': 'unset; a real-scale run starts from a convert.from_hf checkpoint of the '
                 'pretrained LLM and vision tower',
    'data.train_mixture': "the tiny demo's synthetic shapes; point it at LLaVA-format "
                          'JSON/JSONL annotations (llava:PATH[@WEIGHT],...)',
    'data.tokenizer': "unset; point it at the LLM's tokenizer (tokenizer.json, or the Hugging "
                      'Face LLM folder holding it)',
}


def synthetic_misfit(config: ml_collections.ConfigDict) -> str | None:
  """Why the synthetic demo data's tokenizer cannot drive `config.model`, or None if it can:
  a model it cannot drive is real-scale."""
  demo = config.copy_and_resolve_references()
  demo.data.tokenizer = ''
  try:
    pipeline.check_tokenizer(demo, synthetic.synthetic_tokenizer())
  except lavi_config.ConfigError as e:
    return str(e)
  return None


def _file_problems(config: ml_collections.ConfigDict,
                   entries: list[mixture.SourceSpec]) -> list[str]:
  """What is wrong with the stages and with the files that the set keys name."""
  problems = []
  try:
    opt_lib.stages(config.train)
  except ValueError as e:
    problems.append(str(e))
  problems += [f'config.data.train_mixture: annotation file {e.arg} does not exist'
               for e in entries if e.kind == 'llava' and not epath.Path(e.arg).is_file()]
  if config.data.tokenizer:
    try:
      pipeline.check_tokenizer(config, pipeline.make_tokenizer(config.data))
    except (lavi_config.ConfigError, FileNotFoundError) as e:
      problems.append(f'config.data.tokenizer: {e}')
  if config.init_from:
    try:
      stored = (ckpt_lib.find_checkpoint(config.init_from)[0].model
                if from_hf.checkpoint_kind(config.init_from) == 'workdir'
                else from_hf.load_converted_model(config.init_from))
    except FileNotFoundError as e:
      problems.append(f'config.init_from: {e}')
    else:
      problems += [f'config.init_from: {config.init_from} holds a different model '
                   f'(convert or train it with this config): {d}'
                   for d in ckpt_lib.model_config_differences(stored, config.model)]
  return problems


def guide(config: ml_collections.ConfigDict, config_file: str, workdir: str, misfit: str) -> str:
  """What a real-scale run needs (`misfit`: why it is real-scale) and the commands that make
  its starting checkpoint, data and tokenizer."""
  llm_repo = HF_LLMS.get((config.model.llm.hidden_size, config.model.llm.num_layers),
                         'ORG/LLM')
  llm_dir = f'/models/{llm_repo.split("/")[-1]}'
  vision_dir = f'/models/{HF_VISION.split("/")[-1]}'
  converted = f'/models/lavi_{pathlib.Path(config_file).stem}_init'
  return '\n'.join([
      f'{config_file} is a real-scale config (the built-in synthetic demo data cannot drive it: '
      f'{misfit}).',
      f'It needs a converted starting checkpoint, LLaVA-format data and the tokenizer of '
      f'{llm_repo}.',
      'To make them (paths are examples; gs:// URLs work too):',
      '  1. Download the pretrained LLM and vision tower from Hugging Face:',
      f'       hf download {llm_repo} --local-dir {llm_dir}',
      f'       hf download {HF_VISION} --local-dir {vision_dir}',
      '  2. Convert them into a LaVi starting checkpoint (config.init_from):',
      f'       python -m lavi_jax.convert.from_hf --llm {llm_dir} --vision {vision_dir} '
      f'--config {config_file} --out {converted}',
      '  3. Put LLaVA-format JSON/JSONL annotations (e.g. the LLaVA-OneVision data) and their',
      '     images where every host can read them; relative image paths resolve against',
      "     config.data.image_root (default: the annotation file's folder).",
      "  4. Train, with the LLM folder's tokenizer (launch/README.md for TPU pods and Slurm):",
      f'       python -m lavi_jax.main --config={config_file} --workdir={workdir} \\',
      f'         --config.init_from={converted} \\',
      '         --config.data.train_mixture=llava:/data/llava_ov/si.json@1,'
      'llava:/data/llava_ov/ov.json@0.5 \\',
      '         --config.data.image_root=/data/llava_ov/images \\',
      f'         --config.data.tokenizer={llm_dir}',
  ])


def check(config: ml_collections.ConfigDict, config_file: str, workdir: str):
  """Checks the config and what the run reads, before anything heavy is built; raises one
  ConfigError listing every problem (and, for a real-scale config lacking a starting
  checkpoint, data or tokenizer, the commands that make them)."""
  lavi_config.validate(config)
  problems, entries = [], []
  try:
    entries = mixture.parse_mixture(config.data.train_mixture)
  except ValueError as e:
    problems.append(f'config.data.train_mixture: {e}')
  misfit = synthetic_misfit(config)
  demo_values = {'init_from': not config.init_from,
                 'data.train_mixture': bool(entries) and all(e.kind == 'synthetic'
                                                             for e in entries),
                 'data.tokenizer': not config.data.tokenizer}
  unset = [key for key in REAL_SCALE_NEEDS if misfit and demo_values[key]]
  problems = ([f'config.{key}: {REAL_SCALE_NEEDS[key]}' for key in unset] + problems
              + _file_problems(config, entries))
  if not problems:
    return
  lines = [f'{config_file} cannot train yet:'] + [f'  {p}' for p in problems]
  if unset:
    lines += ['', guide(config, config_file, workdir, misfit)]
  raise lavi_config.ConfigError('\n'.join(lines))
