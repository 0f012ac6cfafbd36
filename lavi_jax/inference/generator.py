"""`Generator`: loads a checkpoint once (with its tokenizer and chat template) and answers many
generation requests in batches.

Shapes: B batch (`batch_size`, or fewer when there are fewer requests; a short last batch is
padded with empty rows), T prompt length (rounded up to a power of two, at least 16), so that
few shapes are compiled.

A request that cannot be prepared (empty prompt, a missing image, an unreadable video, a
prompt that does not fit the cache) gets an error result naming it; the other requests of its
batch are answered as usual.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from lavi_jax import config as lavi_config
from lavi_jax.convert import from_hf
from lavi_jax.data import chat, pipeline
from lavi_jax.data.errors import DataError
from lavi_jax.data.tokenizer import Tokenizer, load_tokenizer
from lavi_jax.inference import decode
from lavi_jax.inference.requests import Prepared, Request, Result, prepare
from lavi_jax.inference.sampling import SamplingParams
from lavi_jax.inference.serving import Placement
from lavi_jax.train import checkpoint as ckpt_lib

# Frames sampled from a video when the checkpoint's data config has none (data.num_frames = 0).
DEFAULT_NUM_FRAMES = 8
TEMPLATE_OF_ARCH = {'qwen2': 'chatml', 'llama': 'vicuna_v1'}
MIN_PROMPT_BUCKET = 16

# on_text(request index, new text): called as each request's answer grows.
TextCallback = Callable[[int, str], None]


def load_checkpoint(path: str, placement: Placement | None = None
                    ) -> tuple[ml_collections.ConfigDict, dict, ml_collections.ConfigDict | None]:
  """(model config, params, run config or None) of a `convert.from_hf` output folder or of a
  training workdir (its latest checkpoint; parameters only).

  With a `placement`: the serving model config, and the parameters restored in its dtype
  straight onto its mesh, each device reading only its shards.
  """
  if from_hf.checkpoint_kind(path) == 'converted':
    model, run_config = from_hf.load_converted_model(path), None
  else:
    run_config, state = ckpt_lib.find_checkpoint(path)  # verified here, once
    model = run_config.model
  abstract = None
  if placement is not None:
    model = placement.model(model)
    abstract = placement.abstract_params(model)
  if run_config is None:
    _, params = from_hf.load_converted(path, abstract)
  else:
    params = ckpt_lib.read_params(run_config, state, abstract)
  return model, params, run_config


def find_tokenizer(path: str, run_config: ml_collections.ConfigDict | None) -> Tokenizer:
  """The training run's data.tokenizer, else a tokenizer.json / tokenizer.model in `path`."""
  if run_config is not None:
    return pipeline.make_tokenizer(run_config.data)
  try:
    return load_tokenizer(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e}: pass the tokenizer (a file or a Hugging Face folder)') from e


def default_chat_template(model: ml_collections.ConfigDict,
                          run_config: ml_collections.ConfigDict | None) -> str:
  """The training run's data.chat_template, else the LLM architecture's (TEMPLATE_OF_ARCH)."""
  return (run_config.data.chat_template if run_config is not None
          else TEMPLATE_OF_ARCH[model.llm.arch])


class Generator:
  """Answers `Request`s with a model and its tokenizer. `Generator.load(path)` reads a checkpoint.

  max_len: cache slots per request, prompt and answer together (for fusion='concat' the prompt's
  visual tokens count too); an answer that reaches it ends with finish_reason 'length'.
  num_frames: frames sampled per video (default: data.num_frames, else DEFAULT_NUM_FRAMES).
  placement: the mesh and dtype generation runs in (default: one device, the model's dtypes);
  `params` are cast and laid out for it, and batches are rounded up to its batch shards.
  """

  def __init__(self, model: ml_collections.ConfigDict, params, tokenizer: Tokenizer,
               chat_template: str = 'chatml', data: ml_collections.ConfigDict | None = None,
               max_len: int = 4096, batch_size: int = 8,
               sampling: SamplingParams = SamplingParams(), num_frames: int = 0,
               placement: Placement | None = None):
    data = ml_collections.ConfigDict((data or lavi_config.base_data_config()).to_dict())
    data.chat_template = chat_template
    data.num_frames = num_frames or data.num_frames or DEFAULT_NUM_FRAMES
    config = ml_collections.ConfigDict(dict(model=model, data=data))
    pipeline.check_tokenizer(config, tokenizer)
    self.placement = placement or Placement.single_device()
    self.model = self.placement.model(model)
    self.params = self.placement.place(self.model, params)
    self.tokenizer = tokenizer
    self.template = chat.get_template(chat_template)
    self.spec = pipeline.example_spec(config)
    self.max_len, self.batch_size, self.sampling = max_len, batch_size, sampling
    self.stop_ids = chat.stop_ids(tokenizer, self.template)

  @classmethod
  def load(cls, path: str, tokenizer: str | None = None, chat_template: str | None = None,
           mesh: Mesh | str | None = None, dtype: str | None = None, **kwargs) -> Generator:
    """From a `convert.from_hf` output or a training workdir. The tokenizer defaults to the
    run's, else a tokenizer.json / tokenizer.model in `path`; the template to the run's, else by
    LLM architecture (qwen2: chatml, llama: vicuna_v1).

    mesh: a `(data, fsdp, tensor)` Mesh or its sizes 'DATA,FSDP,TENSOR' (default: one device);
    dtype: the serving dtype of parameters and computation (default: the checkpoint's). The
    parameters are restored in that dtype onto the mesh.
    """
    placement = (Placement.on(mesh, dtype) if isinstance(mesh, Mesh)
                 else Placement.from_flags(mesh, dtype) if mesh else Placement.single_device(dtype))
    model, params, run_config = load_checkpoint(path, placement)
    tok = load_tokenizer(tokenizer) if tokenizer else find_tokenizer(path, run_config)
    if chat_template is None:
      chat_template = default_chat_template(model, run_config)
    data = run_config.data if run_config is not None else None
    return cls(model, params, tok, chat_template, data, placement=placement, **kwargs)

  def generate(self, requests: Sequence[Request | str],
               on_text: TextCallback | None = None) -> list[Result]:
    """One result per request, in order (a string is a prompt without images)."""
    requests = [Request(r) if isinstance(r, str) else r for r in requests]
    results: list[Result | None] = [None] * len(requests)
    pending: list[tuple[int, Prepared]] = []
    # fewer requests than a batch: a smaller batch (a whole number of batch shards)
    rows = self.placement.rows(min(self.batch_size, len(requests)))

    def run_pending():
      for (index, _), result in zip(pending, self._run(requests, pending, rows, on_text)):
        results[index] = result
      pending.clear()

    for index, request in enumerate(requests):
      try:
        pending.append((index, prepare(request, self.tokenizer, self.template, self.spec,
                                       self.model, self.max_len)))
      except DataError as e:
        name = f'request {index}' + (f' (id {request.id!r})' if request.id else '')
        results[index] = Result(id=request.id, error=f'{name}: {e}')
      if len(pending) == rows:
        run_pending()
    if pending:
      run_pending()
    return results

  def _run(self, requests: list[Request], pending: list[tuple[int, Prepared]], b: int,
           on_text: TextCallback | None) -> list[Result]:
    """Generates for up to `b` prepared requests (index into `requests`, inputs) as a batch of
    `b` rows."""
    sampling = [requests[i].sampling or self.sampling for i, _ in pending]
    prepared = [p for _, p in pending]
    n = len(prepared)
    longest = max(len(p.input_ids) for p in prepared)
    t = max(MIN_PROMPT_BUCKET, 1 << (longest - 1).bit_length())
    input_ids = np.full((b, t), self.tokenizer.pad_id, np.int32)
    text_mask = np.zeros((b, t), bool)
    text_mask[n:, 0] = True  # padding rows: one token, nothing generated
    for row, p in enumerate(prepared):
      input_ids[row, :len(p.input_ids)] = p.input_ids
      text_mask[row, :len(p.input_ids)] = True
    visual = {}
    for kind in ('images', 'videos'):
      if any(kind in p.kinds for p in prepared):
        stacked = [p.visual[kind] for p in prepared]
        stacked += [jax.tree.map(np.zeros_like, stacked[0])] * (b - n)
        visual[kind] = jax.tree.map(lambda *x: np.stack(x), *stacked)
    per_row = lambda values, fill: np.array(values + [fill] * (b - n))
    max_new = max(s.max_new_tokens for s in sampling)
    limit = per_row([min(s.max_new_tokens, self.max_len - p.cache_tokens)
                     for s, p in zip(sampling, prepared)], 0)
    stream = None if on_text is None else _TextStream(self, [i for i, _ in pending], on_text)
    out = decode.generate(
        self.model, self.params, input_ids, text_mask, **visual, max_new_tokens=max_new,
        limit=limit, temperature=per_row([s.temperature for s in sampling], 0.0),
        top_k=per_row([s.top_k for s in sampling], 0),
        top_p=per_row([s.top_p for s in sampling], 1.0),
        seeds=per_row([s.seed for s in sampling], 0), stop_ids=self.stop_ids,
        pad_id=self.tokenizer.pad_id, on_tokens=stream, placement=self.placement)
    results = []
    for row, (index, _) in enumerate(pending):
      ids = out.tokens[row, :out.length[row]].tolist()
      stopped = bool(out.stopped[row])
      results.append(Result(id=requests[index].id, text=self.answer_text(ids, stopped),
                            token_ids=ids, finish_reason='stop' if stopped else 'length'))
    return results

  def answer_text(self, ids: list[int], stopped: bool) -> str:
    """The decoded answer, without its stop token."""
    return self.tokenizer.decode(ids[:-1] if stopped else ids)


class _TextStream:
  """Decoder.generate's on_tokens -> on_text(request index, new text) per request."""

  def __init__(self, generator: Generator, indices: list[int], on_text: TextCallback):
    self.generator, self.indices, self.on_text = generator, indices, on_text
    self.sent = [''] * len(indices)

  def __call__(self, tokens: np.ndarray, length: np.ndarray, done: np.ndarray):
    for row, index in enumerate(self.indices):
      ids = tokens[row, :length[row]].tolist()
      stopped = bool(done[row]) and bool(ids) and ids[-1] in self.generator.stop_ids
      text = self.generator.answer_text(ids, stopped)
      if not done[row] and text.endswith('\ufffd'):  # wait for the rest of a character
        continue
      if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
        self.on_text(index, text[len(self.sent[row]):])
        self.sent[row] = text
