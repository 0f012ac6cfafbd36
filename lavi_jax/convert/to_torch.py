"""A LaVi checkpoint -> a Hugging Face-style PyTorch folder.

    python -m lavi_jax.convert.to_torch --checkpoint DIR --out DIR [--step N] [--dtype bfloat16]
        [--max-shard-size 5GB] [--tokenizer PATH]

DIR is a training workdir (its latest checkpoint, or --step) or a `convert.from_hf` output; both
may be URLs (gs://...), as may the output folder. The folder gets `config.json`,
`model.safetensors` (or `model-0000i-of-0000n.safetensors` shards and
`model.safetensors.index.json`) and, when there is a tokenizer (--tokenizer, else the run's, else
one in a convert.from_hf folder), the tokenizer files (the chat template in
tokenizer_config.json) and `generation_config.json`. Tensor names and transforms are
`hf.export_tensor_map`'s: for fusion='viln' (`model_type: lavi`) the LLM as in
Qwen2ForCausalLM / LlamaForCausalLM, the vision tower as SigLIP, the LLaVA projector,
`frame_index.weight` and the conditioners under `conditioners.`; for fusion='concat' a
LlavaForConditionalGeneration folder. A 'viln' folder also gets the model's own code
(`hf_lavi/`: configuration_lavi.py, modeling_lavi.py, processing_lavi.py, registered with
`auto_map`) and, with a tokenizer, preprocessor_config.json, so that transformers alone loads it
(`AutoModelForCausalLM` / `AutoProcessor` with trust_remote_code=True).

Streaming: each shard's header is computed up front from the shapes, then its tensors are
converted and written one at a time. Tensors are ordered by the parameter they come from, so a
shard needs only its own parameters; those are restored from Orbax (as numpy arrays, no device
copies) in groups of about 512 MiB (or one larger parameter: a scanned LLM stacks all layers of
one weight in one parameter) and dropped once written. Each tensor is converted with at most
one copy (layout and dtype together; none when neither changes). Peak host memory is therefore
set by restoring one such group (Orbax holds about twice its size meanwhile) plus one converted
tensor, whatever the shard or model size; `convert.bench_export` measures it.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import struct
from typing import Any, Iterable, Sequence

import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from lavi_jax import config as lavi_config
from lavi_jax.convert import from_hf, hf
from lavi_jax.data import chat
from lavi_jax.data.tokenizer import PLACEHOLDERS, HFTokenizer, Tokenizer, load_tokenizer
from lavi_jax.inference.generator import DEFAULT_NUM_FRAMES, default_chat_template, find_tokenizer
from lavi_jax.models import abstract_params
from lavi_jax.train import checkpoint as ckpt_lib
from lavi_jax.train import lora as lora_lib

DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
          'float16': np.dtype(np.float16)}
_SAFETENSORS_CODES = {np.dtype(v): k for k, v in hf._SAFETENSORS_DTYPES.items()}
READ_BYTES = 2 ** 29  # parameters restored together (512 MiB in their stored dtype)
# The remote code of a fusion='viln' export (no JAX, no lavi_jax), copied next to the weights.
HF_CODE = pathlib.Path(__file__).parent / 'hf_lavi'
HF_CODE_FILES = ('configuration_lavi.py', 'modeling_lavi.py', 'processing_lavi.py', 'pixels.py')
AUTO_MAP = {'AutoConfig': 'configuration_lavi.LaViConfig',
            'AutoModelForCausalLM': 'modeling_lavi.LaViForConditionalGeneration',
            'AutoModelForImageTextToText': 'modeling_lavi.LaViForConditionalGeneration',
            'AutoProcessor': 'processing_lavi.LaViProcessor'}
Path = tuple[str, ...]


def parse_size(text: str) -> int:
  """'5GB' -> 5 * 10**9 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, or a plain number)."""
  match = re.fullmatch(r'\s*([\d.]+)\s*([KMG]i?B)?\s*', text, re.IGNORECASE)
  if not match:
    raise ValueError(f'max shard size {text!r}: expected a number with KB, MB, GB, KiB, ...')
  unit = (match.group(2) or 'B').upper()
  scale = {'B': 1, 'KB': 1e3, 'MB': 1e6, 'GB': 1e9, 'KIB': 2 ** 10, 'MIB': 2 ** 20,
           'GIB': 2 ** 30}[unit]
  return int(float(match.group(1)) * scale)


class Source:
  """The parameters of a checkpoint on disk, read a group of leaves at a time (numpy arrays).

  Attributes: model (model config), run (the run config of a training workdir, else None),
  shapes ({path: (shape, dtype)} as exported: as stored, but a LoRA-stage checkpoint's adapted
  kernels merged, in their adapters' dtype, and no lora/ entries).
  """

  def __init__(self, path: str, step: int | None = None):
    """`step`: that checkpoint of a training workdir (default: the latest)."""
    folder = epath.Path(path)
    if from_hf.checkpoint_kind(path) == 'converted':
      if step is not None:
        raise ValueError(f'{path}: a step is only for a training workdir, not a convert.from_hf '
                         'output')
      self.model = from_hf.load_converted_model(folder)
      ckpt_lib.check_intact(folder, f'convert.from_hf output {folder}')
      self.run, self.directory, self.root = None, folder / 'params', ()
      self.lora = None
    else:
      self.run, self.directory = ckpt_lib.find_checkpoint(path, step)
      self.model, self.root = self.run.model, ('params',)
      self.lora = ckpt_lib.lora_stage(self.run, int(self.directory.parent.name))
    self.path = path
    tree = ocp.PyTreeCheckpointer().metadata(self.directory).item_metadata.tree
    for key in self.root:
      tree = tree[key]
    self.shapes = {k: (tuple(v.shape), np.dtype(v.dtype))
                   for k, v in traverse_util.flatten_dict(tree).items()}
    if self.lora is not None:
      self._merge_adapters()

  def _merge_adapters(self):
    """A checkpoint of a LoRA stage exports its merged weights (lavi_jax.train.lora.merge): the
    adapters (and QLoRA scales) are read beside their targets and leave `shapes`; an int8 target
    takes its adapters' dtype."""
    adapters = {k: v for k, v in self.shapes.items() if k[0] == lora_lib.ROOT}
    self.shapes = {k: v for k, v in self.shapes.items() if k[0] != lora_lib.ROOT}
    pattern = re.compile(self.lora.targets)
    self.adapted = {k for k in self.shapes if pattern.search(lora_lib.SEP.join(k))}
    for k in self.adapted:
      self.shapes[k] = (self.shapes[k][0], adapters[(lora_lib.ROOT, *k, 'a_kernel')][1])
    self.adapter_paths = {k: [a for a in adapters if a[1:-1] == k] for k in self.adapted}
    logging.info('%s: a LoRA-stage checkpoint; its %d adapted kernels are exported merged '
                 '(W + alpha / rank * A @ B)', self.path, len(self.adapted))

  def check(self):
    """The stored parameters are exactly those of `LaVi(self.model)`, shapes included."""
    try:
      lavi_config.validate_model(self.model)
    except lavi_config.ConfigError as e:
      raise hf.ConversionError(f'{self.path}: the stored model config is invalid: {e}') from e
    abstract = abstract_params(self.model)
    expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
    name = lambda path: '/'.join(path)
    problems = [f'missing {name(p)}' for p in sorted(set(expected) - set(self.shapes))]
    problems += [f'unexpected {name(p)}' for p in sorted(set(self.shapes) - set(expected))]
    problems += [f'{name(p)} is {self.shapes[p][0]}, the config gives {shape}'
                 for p, shape in expected.items()
                 if p in self.shapes and self.shapes[p][0] != shape]
    if problems:
      raise hf.ConversionError(f'{self.path}: the parameters do not match the stored model config '
                               f'(model_config.json / the run config): '
                               f'{hf._format_names(problems)}')

  def read(self, paths: Iterable[Path]) -> dict[Path, np.ndarray]:
    """The parameters at `paths`, restored together as numpy arrays (LoRA targets merged)."""
    paths = list(paths)
    adapted = [p for p in paths if self.lora is not None and p in self.adapted]
    restored = self._restore(paths + [a for p in adapted for a in self.adapter_paths[p]])
    if adapted:
      merged = lora_lib.merge(traverse_util.unflatten_dict(restored), self.lora)
      restored = {p: np.asarray(v) for p, v in traverse_util.flatten_dict(merged).items()}
    return {p: restored[p] for p in paths}

  def _restore(self, paths: list[Path]) -> dict[Path, np.ndarray]:
    item, args = {}, {}
    for path in paths:
      node, arg_node = item, args
      for key in self.root + path[:-1]:
        node, arg_node = node.setdefault(key, {}), arg_node.setdefault(key, {})
      node[path[-1]] = 0
      arg_node[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = ocp.PyTreeCheckpointer().restore(
        self.directory, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                    partial_restore=True))
    for key in self.root:
      restored = restored[key]
    return traverse_util.flatten_dict(restored)


def plan_shards(entries: list[hf.Entry], dtype: np.dtype, max_bytes: int
                ) -> list[list[hf.Entry]]:
  """Entries grouped by the parameter they come from, cut into shards of at most `max_bytes`
  (a larger tensor gets a shard of its own)."""
  order = {}
  for e in entries:
    order.setdefault(e.path, len(order))
  shards, size = [[]], 0
  for e in sorted(entries, key=lambda e: order[e.path]):
    n = math.prod(e.hf_shape) * dtype.itemsize
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  return shards


def write_safetensors(file: epath.Path, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                      tensors: Iterable[np.ndarray]):
  """Writes a safetensors file from (name, shape, dtype) `specs` and the `tensors` in that order,
  one at a time: the header (offsets from the shapes) first, then each tensor as it comes."""
  header, offset = {}, 0
  for name, shape, dtype in specs:
    size = math.prod(shape) * dtype.itemsize
    header[name] = dict(dtype=_SAFETENSORS_CODES[dtype], shape=list(shape),
                        data_offsets=[offset, offset + size])
    offset += size
  header['__metadata__'] = {'format': 'pt'}
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
  with epath.Path(file).open('wb') as f:
    f.write(struct.pack('<Q', len(raw)))
    f.write(raw)
    for (name, shape, dtype), x in zip(specs, tensors, strict=True):
      if x.shape != tuple(shape) or x.dtype != dtype:
        raise hf.ConversionError(f'{name}: got {x.shape} {x.dtype}, expected {shape} {dtype}')
      f.write(np.ascontiguousarray(x).view(np.uint8).data)


def write_weights(source: Source, out: epath.Path, dtype: np.dtype | None,
                  max_bytes: int) -> dict[str, Any]:
  """Writes the shards (and the index when there is more than one); returns the index.

  Parameters are restored in groups of at most READ_BYTES (or one larger parameter) and dropped
  once their last tensor is written.
  """
  entries = hf.export_tensor_map(source.model)
  dtypes = {e.path: dtype or source.shapes[e.path][1] for e in entries}
  shards = plan_shards(entries, max(dtypes.values(), key=lambda d: d.itemsize), max_bytes)
  stored_bytes = lambda path: math.prod(source.shapes[path][0]) * source.shapes[path][1].itemsize
  n = len(shards)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    name = 'model.safetensors' if n == 1 else f'model-{i + 1:05d}-of-{n:05d}.safetensors'
    paths = list(dict.fromkeys(e.path for e in shard))  # in the order they are used
    last_use = {e.path: j for j, e in enumerate(shard)}

    def tensors():
      loaded, next_path, size = {}, 0, 0
      for j, e in enumerate(shard):
        if e.path not in loaded:  # restore the next group of parameters
          group, size = [], 0
          while next_path < len(paths) and (
              not group or size + stored_bytes(paths[next_path]) <= READ_BYTES):
            group.append(paths[next_path])
            size += stored_bytes(paths[next_path])
            next_path += 1
          loaded.update(source.read(group))
        leaf = loaded[e.path] if e.index is None else loaded[e.path][e.index]
        # One copy at most: C order and the target dtype at once.
        yield np.asarray(hf.to_hf(e.kind, leaf, e.hf_shape), dtypes[e.path], order='C')
        if last_use[e.path] == j:
          del loaded[e.path]

    write_safetensors(out / name, [(e.hf_name, e.hf_shape, dtypes[e.path]) for e in shard],
                      tensors())
    for e in shard:
      weight_map[e.hf_name] = name
      total += math.prod(e.hf_shape) * dtypes[e.path].itemsize
  index = dict(metadata=dict(total_size=total), weight_map=weight_map)
  if n > 1:
    (out / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2))
  return index


def export_config(model: ml_collections.ConfigDict, dtype: np.dtype,
                  tokenizer: Tokenizer | None) -> dict[str, Any]:
  """config.json: a LaVi config (model_type 'lavi') or, for fusion='concat', a LLaVA one; both
  carry the whole LaVi model config as `lavi_config`."""
  text, vision = hf.hf_text_config(model), hf.hf_vision_config(model)
  if tokenizer is not None:
    text.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id)
  layers = list(model.vision.feature_layers)
  common = dict(text_config=text, vision_config=vision,
                vision_feature_layer=layers[0] if len(layers) == 1 else layers,
                tie_word_embeddings=model.llm.tie_word_embeddings, dtype=dtype.name,
                lavi_config=json.loads(model.to_json_best_effort()))
  if model.fusion == 'concat':
    side = model.vision.image_size // model.vision.patch_size
    return dict(model_type=lavi_config.EXPORT_MODEL_TYPES['concat'],
                architectures=['LlavaForConditionalGeneration'],
                image_token_index=model.image_token_id, vision_feature_select_strategy='full',
                projector_hidden_act='gelu', multimodal_projector_bias=True,
                image_seq_length=side * side, **common)
  return dict(model_type=lavi_config.EXPORT_MODEL_TYPES['viln'],
              architectures=['LaViForConditionalGeneration'], auto_map=AUTO_MAP,
              image_token_id=model.image_token_id, video_token_id=model.video_token_id,
              **common)


def chat_template_jinja(template: chat.ChatTemplate) -> str:
  """`template` as a Jinja chat template (tokenizer_config.json): 'user' / 'assistant' messages,
  each content a string or a list of parts ({'type': 'image' | 'video' | 'text'}) written one per
  line, placeholders as `<image>` / `<video>` (as inference.requests.with_placeholders), the
  turns as `chat.render` writes them; add_generation_prompt ends where the answer starts."""
  user_before, user_after = template.user.split('{}')
  answer_before, answer_after = template.answer.split('{}')
  literal = json.dumps  # a Jinja string literal
  return (
      ('{%- if bos_token -%}{{- bos_token -}}{%- endif -%}' if template.bos else '') +
      f'{{{{- {literal(template.system)} -}}}}'
      '{%- for message in messages -%}'
      "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
      '{%- else -%}{%- set parts = namespace(texts=[]) -%}'
      "{%- for part in message['content'] -%}"
      "{%- if part['type'] == 'text' -%}{%- set parts.texts = parts.texts + [part['text']] -%}"
      "{%- elif part['type'] in ('image', 'video') -%}"
      "{%- set parts.texts = parts.texts + ['<' + part['type'] + '>'] -%}"
      '{%- endif -%}{%- endfor -%}'
      "{%- set text = parts.texts | join('\\n') -%}{%- endif -%}"
      "{%- if message['role'] == 'user' -%}"
      f'{{{{- {literal(user_before)} + text + {literal(user_after)} -}}}}'
      "{%- elif message['role'] == 'assistant' -%}"
      f'{{{{- {literal(template.assistant + answer_before)} + text + '
      f'{literal(answer_after + template.turn_end)} -}}}}'
      "{%- else -%}{{- raise_exception('only user and assistant messages: got ' + "
      "message['role']) -}}{%- endif -%}"
      '{%- endfor -%}'
      f'{{%- if add_generation_prompt -%}}{{{{- {literal(template.assistant)} -}}}}{{%- endif -%}}')


def write_tokenizer(out: epath.Path, tokenizer: Tokenizer, template: chat.ChatTemplate):
  """tokenizer.json (placeholders included) or tokenizer.model, and tokenizer_config.json (the
  placeholders as added tokens, the chat template, left padding for generation)."""
  if isinstance(tokenizer, HFTokenizer):
    tokenizer.save(out / 'tokenizer.json')
    token = tokenizer.tokenizer.id_to_token
    tokenizer_class = 'PreTrainedTokenizerFast'
  else:
    (out / 'tokenizer.model').write_bytes(tokenizer.processor.serialized_model_proto())
    token = tokenizer.processor.id_to_piece
    tokenizer_class = 'LlamaTokenizer'
  names = {f'{key}_token': token(i) for key, i in (('bos', tokenizer.bos_id),
                                                    ('eos', tokenizer.eos_id),
                                                    ('pad', tokenizer.pad_id)) if i is not None}
  added = {str(tokenizer.token_id(t)): dict(content=t, special=True, normalized=False,
                                            lstrip=False, rstrip=False, single_word=False)
           for t in PLACEHOLDERS}
  (out / 'tokenizer_config.json').write_text(json.dumps(dict(
      tokenizer_class=tokenizer_class, added_tokens_decoder=added, padding_side='left',
      chat_template=chat_template_jinja(template), **names), indent=2))


def preprocessor_config(model: ml_collections.ConfigDict,
                        run: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """preprocessor_config.json of a fusion='viln' export: the image processor of
  hf_lavi/processing_lavi.py with the run's (else the default) data settings, as the Generator
  prepares its inputs."""
  data = run.data if run is not None else lavi_config.base_data_config()
  return dict(image_processor_type='LaViImageProcessor', processor_class='LaViProcessor',
              auto_map={'AutoProcessor': AUTO_MAP['AutoProcessor'],
                        'AutoImageProcessor': 'processing_lavi.LaViImageProcessor'},
              size=model.vision.image_size, grids=[list(g) for g in data.anyres_grids],
              max_crops=data.max_crops, num_frames=data.num_frames or DEFAULT_NUM_FRAMES)


def generation_config(model: ml_collections.ConfigDict, tokenizer: Tokenizer,
                      run: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """Stop ids (eos and the chat template's end of answer), pad and bos; greedy by default."""
  template = chat.get_template(default_chat_template(model, run))
  return dict(bos_token_id=tokenizer.bos_id, eos_token_id=chat.stop_ids(tokenizer, template),
              pad_token_id=tokenizer.pad_id, do_sample=False)


def export(checkpoint: str, out_dir: str, dtype: str | None = None,
           max_shard_size: str | int = '5GB', step: int | None = None,
           tokenizer: str | None = None) -> dict[str, Any]:
  """Converts `checkpoint` (at `step`, for a training workdir) into `out_dir` (see the module
  docstring); returns the index. `tokenizer`: a tokenizer file or folder (default: the run's,
  else one in a convert.from_hf folder)."""
  source = Source(checkpoint, step)
  source.check()
  target = DTYPES[dtype] if dtype else None
  max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  try:
    tok = load_tokenizer(tokenizer) if tokenizer else find_tokenizer(checkpoint, source.run)
  except FileNotFoundError as e:
    logging.warning('No tokenizer (%s): the export gets no tokenizer files and no '
                    'generation_config.json; pass one with --tokenizer', e)
    tok = None
  stored = np.dtype(target or source.shapes[('llm', 'embed_tokens', 'embedding')][1])
  config = export_config(source.model, stored, tok)
  index = write_weights(source, out, target, max_bytes)
  (out / 'config.json').write_text(json.dumps(config, indent=2))
  viln = source.model.fusion == 'viln'
  if viln:
    for name in HF_CODE_FILES:
      (out / name).write_text((HF_CODE / name).read_text())
  if tok is not None:
    write_tokenizer(out, tok, chat.get_template(default_chat_template(source.model, source.run)))
    (out / 'generation_config.json').write_text(
        json.dumps(generation_config(source.model, tok, source.run), indent=2))
    if viln:
      (out / 'preprocessor_config.json').write_text(
          json.dumps(preprocessor_config(source.model, source.run), indent=2))
  return index


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='training workdir or convert.from_hf output')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--step', type=int,
                      help='checkpoint step of a training workdir (default: the latest)')
  parser.add_argument('--dtype', choices=sorted(DTYPES), help='tensor dtype (default: as stored)')
  parser.add_argument('--max-shard-size', default='5GB', help='e.g. 5GB, 500MB, 2GiB')
  parser.add_argument('--tokenizer', help='tokenizer.json / tokenizer.model file or a folder '
                      "holding one (default: the run's, else one in the checkpoint folder)")
  args = parser.parse_args(argv)
  index = export(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.step,
                 args.tokenizer)
  files = sorted(set(index['weight_map'].values()))
  print(f'Wrote {len(index["weight_map"])} tensors ({index["metadata"]["total_size"] / 1e9:.3f} '
        f'GB) in {len(files)} file(s) to {args.out}')


if __name__ == '__main__':
  main()
