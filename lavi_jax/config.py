"""Configuration: the defaults every `configs/*.py` starts from, and validation.

A config is an `ml_collections.ConfigDict` with sections `model` (`llm`, `vision`, `projector`,
`viln`, `fusion`), `mesh`, `checkpoint` and the run options. `configs/<name>.py` calls
`base_config()`, changes what differs and returns it; `validate(config)` checks it and says
which key is wrong.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import ml_collections

CONDITIONERS = ('attention', 'mlp', 'conv')
SUBLAYERS = ('attn', 'mlp', 'final')
FUSIONS = ('viln', 'concat')
ATTENTION_BACKENDS = ('auto', 'xla', 'blockwise', 'splash', 'cudnn')  # models/attention.py
LLM_ARCHS = ('qwen2', 'llama')
GATES = ('none', 'tanh')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'qkv_proj')
DTYPES = ('float32', 'bfloat16', 'float16')
# The LLM's norm (Qwen2/LLaMA name) in front of each modulated sub-layer.
NORM_OF_SUBLAYER = {'attn': 'input_layernorm', 'mlp': 'post_attention_layernorm'}
# config.json model_type of a convert.to_torch export, by fusion.
EXPORT_MODEL_TYPES = {'viln': 'lavi', 'concat': 'llava'}


def base_model_config() -> ml_collections.ConfigDict:
  """Model defaults (Qwen2-style LLM, SigLIP-style ViT, attention conditioners)."""
  return ml_collections.ConfigDict(dict(
      fusion='viln',  # 'viln' (LaVi) or 'concat' (LLaVA-style baseline)
      image_token_id=151646,  # placeholder ids in the text, one per visual item
      video_token_id=151647,
      dtype='bfloat16',  # compute dtype
      param_dtype='float32',
      scan_layers=True,  # nn.scan over LLM layers (param axis 'layers')
      remat='full',  # one of REMAT_POLICIES, applied per scanned block
      # Attention backend (models/attention.py): auto (TPU splash, GPU cudnn, else xla), xla,
      # blockwise, splash or cudnn; masks a kernel cannot express fall back to blockwise.
      attention='auto',
      attention_block=512,  # keys per block of the blockwise backend
      llm=dict(
          arch='qwen2',
          vocab_size=151936,
          hidden_size=896,
          intermediate_size=4864,
          num_layers=24,
          num_heads=14,
          num_kv_heads=2,
          head_dim=0,  # 0: hidden_size // num_heads
          rope_theta=1_000_000.0,
          rms_norm_eps=1e-6,
          qkv_bias=True,
          tie_word_embeddings=True,
      ),
      vision=dict(
          image_size=384,
          patch_size=14,
          hidden_size=1152,
          intermediate_size=4304,
          num_layers=27,
          num_heads=16,
          layer_norm_eps=1e-6,
          feature_layers=(-2,),  # indices into (embeddings, layer 1, ..., layer L)
          # lax.scan over the ViT's layers (parameter layout unchanged): less memory at one row
          # per chip, more at several (README, Compile check)
          scan_layers=False,
          video_pool=2,  # bilinear down-scaling of each frame's token grid (1: none)
      ),
      projector=dict(
          ctx_dim=1024,  # d_ctx; ignored for fusion='concat' (projects to the LLM width)
          max_frames=64,  # size of the learned crop/frame-index embedding
      ),
      viln=dict(
          conditioner='attention',
          sublayers=('attn', 'mlp'),  # subset of SUBLAYERS
          every=1,  # modulate layers with index % every == 0 ...
          layers=(),  # ... unless an explicit list of layer indices is given
          kv_groups=1,  # attention/conv: visual K/V (or ConvMixer) shared by this many groups
          heads=8,  # attention conditioner heads
          head_dim=64,
          mlp_dim=1024,  # hidden width of the mlp/conv conditioners
          conv_kernel=3,  # conv: depthwise kernel over the visual token grid
          gate='none',  # 'tanh': deltas scaled by tanh(alpha), alpha initialised to 0
          delta_clip=0.0,  # > 0: deltas soft-clipped to (-delta_clip, delta_clip)
      ),
  ))


# The vision-to-LLM bridge: projector, frame-index embedding and the ViLN conditioners.
ALIGN_PARAMS = '^projector/|^frame_index/|^viln_context/|/conditioner/'


def base_data_config() -> ml_collections.ConfigDict:
  """Data defaults (lavi_jax/data): LLaVA-OneVision-style AnyRes images, ChatML."""
  return ml_collections.ConfigDict(dict(
      # Mixtures: 'KIND:ARG[@WEIGHT],...' with synthetic:SPLIT[:SIZE], llava:PATH (JSON/JSONL),
      # tfds:NAME_OR_DIR#SPLIT (see lavi_jax/data/mixture.py).
      train_mixture='synthetic:train',
      eval_mixture='synthetic:test:1000',
      seed=0,  # shuffling
      batch_size=32,  # global, over all processes (ignored when per_device_batch_size > 0)
      per_device_batch_size=0,  # > 0: global batch = this x the data x fsdp devices
      max_text_len=2048,  # T; longer conversations lose whole trailing turns
      max_crops=10,  # AnyRes crops of a single image, base crop included (1: base crop only)
      anyres_grids=tuple((r, c) for r in range(1, 4) for c in range(1, 4)),  # (rows, cols)
      max_images=10,  # images per record (one base crop each when more than one)
      num_frames=0,  # frames sampled per video; 0: no video input
      # Padding-free visual batches (lavi_jax/data/visual_pool.py): the vision tower encodes
      # frames_per_row crops/frames per row on average (0: max(max_crops, max_images,
      # num_frames), enough for any record of one kind); each row reads up to tokens_per_row
      # visual tokens (0: what the largest record of one kind needs). Rows that do not fit are
      # trimmed (AnyRes to the base crop, then fewer video frames) and counted.
      frames_per_row=0.0,
      tokens_per_row=0,
      chat_template='chatml',  # 'chatml' (Qwen2) or 'vicuna_v1' (LLaMA)
      tokenizer='',  # '' = synthetic word-level; else tokenizer.json / .model / folder
      image_root='',  # relative LLaVA paths; '' = the annotation file's folder
      video_root='',
      tfds_data_dir='',  # '' = TFDS default
      skip_bad_records=False,  # True: skip and count (batch['num_skipped']) bad records
      num_workers=8,  # Grain worker processes; 0 = in-process
      read_threads=4,  # threads reading records in each process
      # question_types: 'colour,count,...' draws only those (see data/synthetic.py); '' = all
      synthetic=dict(seed=0, image_size=64, video_frames=8, video_fraction=0.0,
                     question_types=''),
  ))


LORA_KEYS = ('targets', 'rank', 'alpha', 'dropout', 'quantize')
LORA_QUANTIZE = ('none', 'int8')
# LoRA targets for an LLM's attention and MLP projections (not the conditioners' q/o_proj).
LLM_PROJECTIONS = r'^llm/layers.*/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$'


def lora_config(targets: str = LLM_PROJECTIONS, rank: int = 64, alpha: float = 128.0,
                quantize: str = 'none') -> ml_collections.ConfigDict:
  """A stage's `lora` section: adapters of `rank` on the kernels `targets` matches (regex over
  parameter paths), scaled by alpha / rank; quantize='int8' holds their frozen base in int8
  (QLoRA). rank=0: off (the section is there so that command-line flags can turn it on)."""
  return ml_collections.ConfigDict(dict(targets=targets, rank=rank, alpha=alpha, dropout=0.0,
                                        quantize=quantize))


def base_config() -> ml_collections.ConfigDict:
  """A whole run config with model defaults; configs/*.py start from this."""
  return ml_collections.ConfigDict(dict(
      model=base_model_config(),
      mesh=dict(
          data=1,
          fsdp=-1,  # -1: all remaining devices
          tensor=1,
          rules='fsdp',  # one of lavi_jax.sharding.RULE_PRESETS
          num_slices=1,  # > 1: multi-slice pod, 'data' spans slices (DCN)
          num_devices=0,  # dry run only: report per-device bytes for this many devices
      ),
      data=base_data_config(),
      train=dict(
          # Stages run in this order; each names its trainable parameters by a regex over
          # parameter paths like 'llm/layers/layer_0/self_attn/q_proj/kernel'. Frozen
          # parameters get no gradient and no optimizer state. `lora` (rank > 0: on; see
          # lora_config) trains low-rank adapters of its target kernels, which stay frozen.
          stage_order=('align', 'finetune'),
          stages=dict(
              align=dict(steps=1000, trainable=ALIGN_PARAMS, learning_rate=1e-3,
                         warmup_steps=30, lr_scale='', lora=lora_config(rank=0)),
              finetune=dict(steps=2000, trainable=ALIGN_PARAMS + '|^llm/', learning_rate=2e-5,
                            warmup_steps=60, lr_scale='', lora=lora_config(rank=0)),
          ),
          b1=0.9,
          b2=0.95,
          eps=1e-8,
          weight_decay=0.0,
          clip_norm=1.0,  # global gradient-norm clipping (0: off)
          end_lr_fraction=0.0,  # cosine decay ends at this fraction of the peak
          accumulation_steps=1,  # micro-batches per optimizer step
          loss_chunk=256,  # positions whose float32 logits exist at once in the loss
          log_every=10,
          peak_flops_per_device=0.0,  # 0: look up the device kind (for MFU)
      ),
      checkpoint=dict(
          every=500,  # steps between checkpoints (and one at the end of each stage)
          keep=3,  # keep the last N ...
          keep_every=0,  # ... plus every K-th step (0: none)
          async_save=True,
      ),
      eval=dict(  # benchmarks during training (lavi_jax/eval; lmms-eval task names)
          tasks='',  # e.g. 'pope_random,mme'; '' = none
          every=0,  # steps between runs (0: off); headline metrics go to the metrics log
          data_dir='',  # the dataset exports (README, "Evaluation")
          limit=0,  # first N records per task (0: all)
          batch_size=8,  # requests decoded together
          max_len=2048,  # cache slots per request: prompt and answer together
          max_new_tokens=0,  # cap on the tasks' generation limits (0: theirs)
          dtype='',  # parameters and computation while answering ('': the model's)
          # blocks removed from answers before scoring: 'default' (lmms-eval's <think> and
          # <analysis>), 'none', or a JSON list of [start, end] tag pairs
          reasoning_tags='default',
      ),
      init_from='',  # a convert.from_hf output, or a training workdir (its latest checkpoint)
      seed=0,
      dry_run=False,
  ))


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of a config file given by path."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f'config file {path} does not exist')
  spec = importlib.util.spec_from_file_location(f'lavi_config_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def _tuples(value):
  """JSON lists -> tuples (as the config's sequence fields are)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def from_json(data: dict) -> ml_collections.ConfigDict:
  """A config (or section) stored as JSON (`to_json`, `to_json_best_effort`) -> ConfigDict."""
  return ml_collections.ConfigDict(_tuples(data))


def head_dim(llm: ml_collections.ConfigDict) -> int:
  return llm.head_dim or llm.hidden_size // llm.num_heads


def ctx_dim(model: ml_collections.ConfigDict) -> int:
  """Width of the projected visual tokens V."""
  return model.llm.hidden_size if model.fusion == 'concat' else model.projector.ctx_dim


def modulated_layers(model: ml_collections.ConfigDict) -> tuple[bool, ...]:
  """Per LLM layer: whether its attn/mlp norms are ViLN-modulated."""
  n = model.llm.num_layers
  if model.fusion != 'viln':
    return (False,) * n
  chosen = set(model.viln.layers) if model.viln.layers else set(range(0, n, model.viln.every))
  return tuple(i in chosen for i in range(n))


def group_of_layer(layer: int, num_layers: int, kv_groups: int) -> int:
  """Conditioner group of an LLM layer: contiguous blocks of layers share a group."""
  return layer * kv_groups // num_layers


def num_modulated_norms(model: ml_collections.ConfigDict) -> int:
  """ViLN-modulated norms of the LLM (each has its own conditioner); 0 for concat."""
  if model.fusion != 'viln':
    return 0
  per_layer = len([s for s in model.viln.sublayers if s != 'final'])
  return sum(modulated_layers(model)) * per_layer + ('final' in model.viln.sublayers)


def num_visual_tokens_per_frame(vision: ml_collections.ConfigDict, video: bool) -> int:
  side = vision.image_size // vision.patch_size
  if video and vision.video_pool > 1:
    side = -(-side // vision.video_pool)
  return side * side


class ConfigError(ValueError):
  """A config value is invalid; the message names the key."""


def from_export_config(hf: dict, where: str) -> ml_collections.ConfigDict:
  """The model config (`lavi_config`) of a convert.to_torch export's config.json (dict), checked
  against its model_type; `where` names the export in errors."""
  kind = hf.get('model_type')
  if kind not in EXPORT_MODEL_TYPES.values() or 'lavi_config' not in hf:
    raise ConfigError(f'{where}: config.json has model_type={kind!r} and '
                      f'{"a" if "lavi_config" in hf else "no"} lavi_config; a convert.to_torch '
                      "export has model_type 'lavi' (or 'llava' for fusion='concat') and a "
                      'lavi_config')
  model = from_json(hf['lavi_config'])
  if EXPORT_MODEL_TYPES.get(model.fusion) != kind:
    raise ConfigError(f'{where}: config.json has model_type {kind!r} with lavi_config.fusion='
                      f'{model.fusion!r}')
  return model


def _check(ok: bool, key: str, message: str):
  if not ok:
    raise ConfigError(f'config.{key}: {message}')


def validate_model(model: ml_collections.ConfigDict):
  """Checks a model config; raises ConfigError naming the bad key."""
  llm, vision, viln = model.llm, model.vision, model.viln
  _check(model.fusion in FUSIONS, 'model.fusion', f'{model.fusion!r} is not one of {FUSIONS}')
  _check(llm.arch in LLM_ARCHS, 'model.llm.arch', f'{llm.arch!r} is not one of {LLM_ARCHS}')
  _check(model.dtype in DTYPES, 'model.dtype', f'{model.dtype!r} is not one of {DTYPES}')
  _check(model.param_dtype in DTYPES, 'model.param_dtype',
         f'{model.param_dtype!r} is not one of {DTYPES}')
  _check(model.remat in REMAT_POLICIES, 'model.remat',
         f'{model.remat!r} is not one of {REMAT_POLICIES}')
  _check(model.attention in ATTENTION_BACKENDS, 'model.attention',
         f'{model.attention!r} is not one of {ATTENTION_BACKENDS}')
  _check(model.attention_block > 0, 'model.attention_block', 'must be positive')
  for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
              'num_kv_heads'):
    _check(llm[key] > 0, f'model.llm.{key}', f'must be positive, got {llm[key]}')
  _check(llm.num_heads % llm.num_kv_heads == 0, 'model.llm.num_heads',
         f'{llm.num_heads} heads are not divisible by num_kv_heads={llm.num_kv_heads}')
  if not llm.head_dim:
    _check(llm.hidden_size % llm.num_heads == 0, 'model.llm.hidden_size',
           f'{llm.hidden_size} is not divisible by num_heads={llm.num_heads} '
           '(or set model.llm.head_dim)')
  _check(head_dim(llm) % 2 == 0, 'model.llm.head_dim', 'RoPE needs an even head_dim')
  _check(vision.hidden_size % vision.num_heads == 0, 'model.vision.hidden_size',
         f'{vision.hidden_size} is not divisible by num_heads={vision.num_heads}')
  _check(vision.image_size >= vision.patch_size, 'model.vision.image_size',
         f'{vision.image_size} is smaller than patch_size={vision.patch_size}')
  _check(len(vision.feature_layers) > 0, 'model.vision.feature_layers', 'must not be empty')
  for f in vision.feature_layers:
    _check(-(vision.num_layers + 1) <= f <= vision.num_layers, 'model.vision.feature_layers',
           f'{f} is out of range for {vision.num_layers} layers')
  _check(vision.video_pool >= 1, 'model.vision.video_pool', 'must be >= 1')
  _check(model.projector.max_frames > 0, 'model.projector.max_frames', 'must be positive')
  _check(model.image_token_id != model.video_token_id, 'model.video_token_id',
         'must differ from image_token_id')
  if model.fusion != 'viln':
    return
  _check(viln.conditioner in CONDITIONERS, 'model.viln.conditioner',
         f'{viln.conditioner!r} is not one of {CONDITIONERS}')
  unknown = [s for s in viln.sublayers if s not in SUBLAYERS]
  _check(not unknown, 'model.viln.sublayers', f'unknown names {unknown}; choose from {SUBLAYERS}')
  _check(len(viln.sublayers) > 0, 'model.viln.sublayers', 'must name at least one sublayer')
  _check(viln.every >= 1, 'model.viln.every', 'must be >= 1')
  bad = [i for i in viln.layers if not 0 <= i < llm.num_layers]
  _check(not bad, 'model.viln.layers', f'{bad} out of range for {llm.num_layers} layers')
  _check(1 <= viln.kv_groups <= llm.num_layers, 'model.viln.kv_groups',
         f'must be in [1, {llm.num_layers}], got {viln.kv_groups}')
  _check(viln.gate in GATES, 'model.viln.gate', f'{viln.gate!r} is not one of {GATES}')
  _check(viln.delta_clip >= 0, 'model.viln.delta_clip', 'must be >= 0')
  _check(viln.heads > 0 and viln.head_dim > 0, 'model.viln.heads', 'heads and head_dim > 0')
  _check(viln.conv_kernel % 2 == 1, 'model.viln.conv_kernel', 'must be odd')
  _check(model.projector.ctx_dim > 0, 'model.projector.ctx_dim', 'must be positive')


def global_batch_size(config: ml_collections.ConfigDict, num_devices: int | None = None) -> int:
  """Rows of one optimizer step over all processes, checked against the mesh.

  `data.per_device_batch_size` x (data x fsdp) devices when set, else `data.batch_size`; it must
  split evenly over the batch shards (data x fsdp) and each of `train.accumulation_steps`
  micro-batches over them again. `num_devices` defaults to the devices at hand.
  """
  from lavi_jax import sharding  # local: sharding imports jax
  data, fsdp, _ = sharding.resolve_mesh_shape(config.mesh, num_devices)
  shards, steps = data * fsdp, config.train.accumulation_steps
  per_device = config.data.per_device_batch_size
  _check(per_device >= 0, 'data.per_device_batch_size', f'must be >= 0, got {per_device}')
  _check(steps >= 1, 'train.accumulation_steps', f'must be >= 1, got {steps}')
  batch = per_device * shards if per_device else config.data.batch_size
  key = 'data.per_device_batch_size' if per_device else 'data.batch_size'
  _check(batch > 0, key, f'must be positive, got {batch}')
  _check(batch % (shards * steps) == 0, key,
         f'the global batch of {batch} rows does not split into {steps} accumulation '
         f'micro-batch(es) over the {shards} batch shards (mesh data={data} x fsdp={fsdp}): it '
         f'must be a multiple of {shards * steps}. Set data.per_device_batch_size (a multiple '
         f'of train.accumulation_steps), or a data.batch_size that is a multiple of '
         f'{shards * steps}')
  return batch


def validate_lora(name: str, lora: ml_collections.ConfigDict):
  """Checks `train.stages.NAME.lora`; raises ConfigError naming the bad key."""
  key = f'train.stages.{name}.lora'
  unknown = sorted(set(lora) - set(LORA_KEYS))
  _check(not unknown, key, f'unknown keys {unknown}; the keys are {LORA_KEYS}')
  missing = [k for k in LORA_KEYS if k not in lora]
  _check(not missing, key, f'missing keys {missing} (start from lavi_jax.config.lora_config())')
  _check(isinstance(lora.rank, int) and lora.rank >= 0, f'{key}.rank',
         f'must be an integer >= 0 (0: off), got {lora.rank!r}')
  _check(lora.alpha > 0, f'{key}.alpha', f'must be positive, got {lora.alpha}')
  _check(lora.dropout == 0, f'{key}.dropout', f'only 0 is supported, got {lora.dropout}')
  _check(lora.quantize in LORA_QUANTIZE, f'{key}.quantize',
         f'{lora.quantize!r} is not one of {LORA_QUANTIZE}')
  _check(isinstance(lora.targets, str) and bool(lora.targets), f'{key}.targets',
         'must be a non-empty regex over parameter paths')
  try:
    re.compile(lora.targets)
  except re.error as e:
    raise ConfigError(f'config.{key}.targets: {lora.targets!r} is not a regex: {e}') from e


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> int:
  """Checks a whole run config (model; stages' LoRA; mesh and batch against `num_devices`,
  default: the devices at hand). Returns the global batch size."""
  validate_model(config.model)
  for name, stage in config.train.stages.items():
    if 'lora' in stage:
      validate_lora(name, stage.lora)
  types = config.data.synthetic.get('question_types', '')
  known = ('colour', 'count', 'position', 'yes_no', 'motion')  # data/synthetic.py QUESTION_TYPES
  bad = [t for t in types.split(',') if t.strip() not in known] if types else []
  _check(not bad, 'data.synthetic.question_types',
         f'unknown question types {bad}; choose comma-separated names from {known} (\'\': all)')
  _check(config.eval.dtype in ('',) + DTYPES, 'eval.dtype',
         f'{config.eval.dtype!r} is not one of {DTYPES} (or \'\': the model\'s)')
  return global_batch_size(config, num_devices)
