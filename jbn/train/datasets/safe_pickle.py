"""A restricted unpickler for data files: containers, bytes, str, ints and NumPy arrays only.

``pickle.load`` runs whatever a file asks for: a pickle can name any callable
(``os.system``, ``builtins.eval``, ...) and have it called while loading. The
CIFAR data files are pickles, so a file dropped into the data directory could
run arbitrary code. `load` refuses every global except the few that NumPy
arrays need, so nothing outside this list is ever imported or called:

- ``numpy.ndarray`` and ``numpy.dtype`` (an array's class and element type),
- numpy's ``_reconstruct`` (protocols 0-4; only for ``numpy.ndarray`` itself) and
  ``_frombuffer`` (protocol 5), under their NumPy 1 (``numpy.core``) and
  NumPy 2 (``numpy._core``) module names,
- ``_codecs.encode`` with the ``latin1`` encoding only (how Python 3 writes
  ``bytes`` at protocol 2, as in the fixtures of the tests).

Dicts, lists, tuples, bytes, str, ints, floats, bools and None need no global.

Example:
    >>> entry = load(path)  # doctest: +SKIP
    >>> entry[b"data"].shape  # doctest: +SKIP
    (10000, 3072)
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from typing import Any

import numpy as np

from jbn.train.datasets.base import DataFileError

__all__ = ["UnsafePickleError", "load", "loads"]

# The functions NumPy's own pickles call, taken from NumPy so that both the
# ``numpy.core`` (NumPy 1) and ``numpy._core`` (NumPy 2) spellings map to them.
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


class UnsafePickleError(DataFileError):
    """A data file's pickle asks for a global that data files never contain."""


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subclass {subtype!r} is not allowed")
    return _NUMPY_RECONSTRUCT(subtype, shape, dtype)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None


def _unpickle(file: Any, source: str) -> Any:
    try:
        return _RestrictedUnpickler(file, encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{source}: refused to load: the pickle asks for {e}, which a data file never "
            "holds (only dicts, lists, bytes, str, ints and NumPy arrays are accepted). "
            "The file is corrupt or was tampered with; replace it with the official file."
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataFileError(f"{source}: not a readable data file ({e}).") from None


def load(path: str | os.PathLike) -> Any:
    """Unpickles the file at ``path`` with only the allowed globals.

    Python 2 ``str`` objects (the official CIFAR files) come back as ``bytes``.

    Args:
        path: The pickle file.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: If the pickle names any other global; nothing is called.
        DataFileError: If the pickle is truncated or malformed.
    """
    with open(path, "rb") as f:
        return _unpickle(f, os.fspath(path))


def loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """`load` for a pickle held in memory; ``source`` names it in error messages."""
    return _unpickle(io.BytesIO(data), source)
