"""The error raised for bad input data (files, records, conversations)."""

import os

import numpy as np


class DataError(ValueError):
  """A record or file cannot be used; the message names the file and/or record id.

  With `config.data.skip_bad_records`, the pipeline skips records that raise it and counts them.
  """


def describe(ref) -> str:
  """A short name of an image/video reference (path, bytes, array) for error messages."""
  if isinstance(ref, (str, os.PathLike)):
    return os.fspath(ref)
  if isinstance(ref, bytes):
    return f'<{len(ref)} encoded bytes>'
  if isinstance(ref, np.ndarray):
    return f'<array {ref.shape} {ref.dtype}>'
  return f'<{type(ref).__name__}>'
