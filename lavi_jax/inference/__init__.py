"""KV-cache generation: `Generator` (checkpoint + tokenizer -> answers to requests),
`decode.generate` (token ids with a KV cache), and `python -m lavi_jax.inference.generate`."""

from lavi_jax.inference.generator import Generator
from lavi_jax.inference.requests import Request, Result
from lavi_jax.inference.sampling import SamplingParams

__all__ = ['Generator', 'Request', 'Result', 'SamplingParams']
