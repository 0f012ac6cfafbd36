"""Hugging Face checkpoints -> a LaVi Orbax checkpoint.

    python -m lavi_jax.convert.from_hf --llm DIR --vision DIR --config configs/7b.py --out DIR
    python -m lavi_jax.convert.from_hf --llava DIR --config configs/7b.py --out DIR
    python -m lavi_jax.convert.from_hf --lavi DIR --out DIR     (a convert.to_torch export)

The LLM / vision shapes (and, for --llava, the feature layers and placeholder ids) come from the
HF configs and override the config file's; everything else (fusion, ViLN, projector width, ...)
is the config file's. Parameters not in the HF checkpoints (ViLN conditioners, zero-initialised
where the model says so; the projector unless --llava with fusion='concat') are initialised as
`LaVi.init` does. A `convert.to_torch` export (--lavi) holds every parameter and its model
config, so it needs no config file. Writes `{out}/params` (Orbax StandardCheckpointer) and
`{out}/model_config.json`; `load_converted(out)` reads them back.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from lavi_jax import config as lavi_config
from lavi_jax import paths
from lavi_jax.convert import hf
from lavi_jax import models
from lavi_jax.train import checkpoint as ckpt_lib


def import_hf(model: ml_collections.ConfigDict, llm: str | None = None, vision: str | None = None,
              llava: str | None = None) -> tuple[ml_collections.ConfigDict, hf.Params]:
  """(model config updated from the HF configs, imported params, cast to `model.param_dtype`)."""
  dtype = jnp.dtype(model.param_dtype)
  if llava:
    model, imported = hf.load_hf_llava(llava, model, dtype, fusion=model.fusion)
  else:
    model, llm_params = hf.load_hf_llm(llm, model, dtype)
    model, vit_params = hf.load_hf_vision(vision, model, dtype)
    imported = {'llm': llm_params, 'vit': vit_params}
  lavi_config.validate_model(model)
  return model, imported


def _to_device(tree: dict):
  """Numpy leaves -> jax arrays, in place and one at a time (each host copy is freed as it goes
  when nothing else holds it)."""
  for key, value in tree.items():
    if isinstance(value, dict):
      _to_device(value)
    else:
      tree[key] = jax.device_put(value)


def save_converted(out_dir: str | epath.PathLike, model: ml_collections.ConfigDict, params):
  """Writes `{out_dir}/model_config.json` and the Orbax checkpoint `{out_dir}/params`.

  The leaves of `params` become jax arrays (in place), so that the checkpoint restores with any
  sharding.
  """
  out = paths.absolute(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'model_config.json').write_text(model.to_json(indent=2))
  _to_device(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out / 'params', params)
  checkpointer.wait_until_finished()
  ckpt_lib.write_manifest(out)


def load_converted_model(out_dir: str | epath.PathLike) -> ml_collections.ConfigDict:
  """The model config that `save_converted` wrote to `{out_dir}/model_config.json`."""
  file = epath.Path(out_dir) / 'model_config.json'
  if not file.is_file():
    raise FileNotFoundError(f'{out_dir} has no model_config.json: not a convert.from_hf output')
  return lavi_config.from_json(json.loads(file.read_text()))


def load_converted(out_dir: str | epath.PathLike,
                   abstract_params=None) -> tuple[ml_collections.ConfigDict, hf.Params]:
  """Reads what `save_converted` wrote: (model config, params as jax arrays).

  `abstract_params`: ShapeDtypeStructs with shardings to restore onto (default: the stored
  model's shapes on the default device).
  """
  out = paths.absolute(out_dir)
  model = load_converted_model(out)
  ckpt_lib.check_intact(out, f'convert.from_hf output {out}')
  if abstract_params is None:
    abstract_params = models.abstract_params(model)
  params = ocp.StandardCheckpointer().restore(out / 'params', abstract_params)
  return model, params


def checkpoint_kind(path: str) -> str:
  """'converted' (a convert.from_hf output) or 'workdir' (a training workdir) for `path`."""
  folder = epath.Path(path)
  if (folder / 'model_config.json').exists():
    return 'converted'
  if (folder / 'checkpoints').exists():
    return 'workdir'
  raise FileNotFoundError(f'{path} is neither a convert.from_hf output (model_config.json) '
                          'nor a training workdir (checkpoints/)')


def load_config_file_model(path: str) -> ml_collections.ConfigDict:
  """The `model` section of a config file (`file.py` or `file.py:arg`)."""
  file, _, arg = path.partition(':')
  return lavi_config.load_config_file(file, arg or None).model


def convert(config_path: str | None, out_dir: str, llm: str | None = None,
            vision: str | None = None, llava: str | None = None, seed: int = 0,
            lavi: str | None = None):
  """Imports the HF checkpoints, initialises the rest of LaVi and saves; returns (model, params).

  `lavi`: a convert.to_torch export instead (its own model config; `config_path` unused).
  """
  if lavi:
    model, imported = hf.load_hf_lavi(lavi)
  else:
    model, imported = import_hf(load_config_file_model(config_path), llm, vision, llava)
  if llava and model.fusion != 'concat':
    print(f"fusion={model.fusion!r}: LLaVA's projector is not used, LaVi's starts fresh.")
  taken = sum(x.size for x in jax.tree.leaves(imported))
  params = hf.init_with_imported(model, imported, jax.random.key(seed))
  del imported  # its arrays now live in params only
  total = sum(x.size for x in jax.tree.leaves(params))
  print(f'{total:,} parameters: {taken:,} imported, {total - taken:,} initialised.')
  save_converted(out_dir, model, params)
  print(f'Wrote {out_dir}')
  return model, params


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', help='config file, e.g. configs/7b.py[:arg] (not with --lavi)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--llm', help='Qwen2ForCausalLM / LlamaForCausalLM folder')
  parser.add_argument('--vision', help='SiglipVisionModel / SiglipModel folder')
  parser.add_argument('--llava', help='LlavaForConditionalGeneration / '
                      'LlavaOnevisionForConditionalGeneration folder (instead of --llm/--vision)')
  parser.add_argument('--lavi', help='convert.to_torch export (LaVi or LLaVA layout), back to JAX')
  parser.add_argument('--seed', type=int, default=0, help='seed of the fresh parameters')
  args = parser.parse_args(argv)
  if args.lavi:
    if args.llava or args.llm or args.vision or args.config:
      parser.error('--lavi takes no --config, --llava, --llm or --vision')
  elif not args.config:
    parser.error('give --config')
  elif args.llava and (args.llm or args.vision):
    parser.error('give either --llava or --llm and --vision')
  elif not args.llava and not (args.llm and args.vision):
    parser.error('give --llm and --vision (or --llava, or --lavi)')
  convert(args.config, args.out, args.llm, args.vision, args.llava, args.seed, args.lavi)


if __name__ == '__main__':
  main()
