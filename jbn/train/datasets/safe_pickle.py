"""A restricted unpickler for data files: containers, bytes, str, numbers and plain NumPy arrays.

``pickle.load`` runs whatever a file asks for: a pickle can name any callable
(``os.system``, ``builtins.eval``, ...) and have it called while loading. The
CIFAR data files are pickles, so a file dropped into the data directory could
run arbitrary code. `load` refuses every global except the few that NumPy
arrays need, and none of those is handed to the file as is:

- ``numpy.dtype`` builds only plain element types from a type code (bool,
  integers, floats, complex, bytes, str: kinds ``b i u f c S U``); object,
  void, structured, sub-array and datetime types are refused. The state the
  file then gives the type (pickle's BUILD) may set its byte order and
  nothing else: a file that adds fields or flags to a type (say, an object
  field over raw bytes, whose pointer would be freed on exit) is refused.
- ``numpy.ndarray`` is no callable: it only names the class for numpy's
  ``_reconstruct`` (protocols 0-4), which makes the array that BUILD then
  fills from bytes, with a type checked as above. ``_frombuffer``
  (protocol 5) takes checked types only. Both are accepted under their
  NumPy 1 (``numpy.core``) and NumPy 2 (``numpy._core``) module names.
- ``_codecs.encode`` with the ``latin1`` encoding only (how Python 3 writes
  ``bytes`` at protocol 2, as in the fixtures of the tests).

BUILD on anything else is refused. Dicts, lists, tuples, bytes, str, ints,
floats, bools and None need no global. The unpickler is Python's own
pure-Python one (``pickle._Unpickler``), the one whose BUILD can be
replaced; a data file holds a few large byte strings, so it reads them about
as fast as the C one.

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
import struct
from typing import Any

import numpy as np

from jbn.train.datasets.base import DataFileError

__all__ = ["PLAIN_KINDS", "UnsafePickleError", "load", "loads"]

# The functions NumPy's own pickles call, taken from NumPy so that both the
# ``numpy.core`` (NumPy 1) and ``numpy._core`` (NumPy 2) spellings map to them.
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

# Element types a data file may hold: bool, signed and unsigned integers,
# floats, complex, bytes and str.
PLAIN_KINDS = "biufcSU"


class UnsafePickleError(DataFileError):
    """A data file's pickle asks for something data files never contain."""


class _Refused(pickle.UnpicklingError):
    """Something a data file never holds; the message says what."""


class _ClassName:
    """Stands for a class the file names but may not call (``numpy.ndarray``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NDARRAY = _ClassName("numpy.ndarray")


def _check_plain(dtype: Any) -> np.dtype:
    """Returns ``dtype`` if it is a plain element type (`PLAIN_KINDS`), else refuses it."""
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"an array of element type {dtype!r}")
    if (
        dtype.kind not in PLAIN_KINDS
        or dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.hasobject
        or dtype.metadata
    ):
        raise _Refused(
            f"numpy.dtype({dtype.str!r}) (kind {dtype.kind!r}; plain numbers, bytes or str only)"
        )
    return dtype


def _text(value: Any) -> Any:
    """Python 2 ``str`` values arrive as bytes (``encoding="bytes"``): ASCII codes as str."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise _Refused(f"a type code {value!r}") from None
    return value


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype(spec)`` for a type code of a plain type; always a new object.

    A new object, because the BUILD that follows sets its byte order in place
    (``align`` and ``copy`` are what numpy pickles; neither changes a plain type).
    """
    del align, copy
    spec = _text(spec)
    if not isinstance(spec, str):
        raise _Refused(f"numpy.dtype({spec!r}) (a type code is the only spec data files hold)")
    try:
        dtype = np.dtype(spec)
    except TypeError as e:
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}): {e}") from None
    return np.dtype(_check_plain(dtype), copy=True)


def _set_dtype_state(dtype: np.dtype, state: Any) -> None:
    """BUILD of a type from `_dtype`: only the byte order is taken from ``state``.

    numpy writes ``(3, byteorder, subarray, names, fields, elsize, alignment,
    flags)``; for a plain type the three in the middle are None. Anything
    there is refused; ``elsize``, ``alignment`` and ``flags`` are not read
    (the type code fixed them), so a file cannot set them.
    """
    if not isinstance(state, tuple) or len(state) not in (8, 9):
        raise _Refused(f"a numpy.dtype state of {type(state).__name__} {state!r:.80}")
    if any(part is not None for part in state[2:5]) or (len(state) == 9 and state[8]):
        raise _Refused(
            f"numpy.dtype({dtype.str!r}) with a sub-array, fields or metadata in its state"
        )
    order = _text(state[1])
    allowed = ("|",) if dtype.byteorder == "|" else ("<", ">", "=")
    if order not in allowed:
        raise _Refused(f"numpy.dtype({dtype.str!r}) with byte order {order!r}")
    canonical = list(dtype.__reduce__()[2])  # What numpy itself writes for this type.
    canonical[1] = order
    dtype.__setstate__(tuple(canonical))
    _check_plain(dtype)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """NumPy's ``_reconstruct`` for ``numpy.ndarray`` only: an empty array that BUILD fills.

    ``shape`` and ``dtype`` are placeholders in numpy's pickles (the state
    holds the real ones, checked in `_set_array_state`), so they are not used.
    """
    del shape, dtype
    if subtype is not _NDARRAY:
        raise _Refused(f"array subclass {subtype!r} (numpy.ndarray only)")
    return _NUMPY_RECONSTRUCT(np.ndarray, (0,), "b")


def _set_array_state(array: np.ndarray, state: Any) -> None:
    """BUILD of an array from `_reconstruct`: a plain type and its raw bytes."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _Refused(f"an array state of {type(state).__name__} {state!r:.80}")
    dtype, data = state[-3], state[-1]
    _check_plain(dtype)
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused(f"array data of type {type(data).__name__} (raw bytes only)")
    array.__setstate__(state)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any, *rest: Any) -> np.ndarray:
    """NumPy's ``_frombuffer`` (protocol 5) for plain types and in-band bytes."""
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)):
        raise _Refused(f"array data of type {type(buffer).__name__} (raw bytes only)")
    return _NUMPY_FROMBUFFER(buffer, _check_plain(dtype), shape, order, *rest)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's unpickler with `_ALLOWED_GLOBALS` only and BUILD for arrays and types only."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) is np.ndarray:
            _set_array_state(target, state)
        elif isinstance(target, np.dtype):
            _set_dtype_state(target, state)
        else:
            raise _Refused(f"the state of a {type(target).__name__} (pickle BUILD)")

    dispatch[pickle.BUILD[0]] = load_build


# What a malformed or cut pickle raises in the pure-Python unpickler.
_MALFORMED = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    struct.error,
)


def _unpickle(file: Any, source: str) -> Any:
    try:
        return _RestrictedUnpickler(file, encoding="bytes").load()
    except _Refused as e:
        raise UnsafePickleError(
            f"{source}: refused to load: the pickle asks for {e}, which a data file never "
            "holds (only dicts, lists, bytes, str, numbers and NumPy arrays of numbers, bytes "
            "or str are accepted). The file is corrupt or was tampered with; replace it with "
            "the official file."
        ) from None
    except _MALFORMED as e:
        # The pure-Python unpickler fails on a cut file wherever the bytes run out.
        cut = "truncated: the file ends inside the pickle; " if not file.read(1) else ""
        raise DataFileError(f"{source}: not a readable data file ({cut}{e!r}).") from None


def load(path: str | os.PathLike) -> Any:
    """Unpickles the file at ``path`` with only the allowed globals.

    Python 2 ``str`` objects (the official CIFAR files) come back as ``bytes``.

    Args:
        path: The pickle file.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: If the pickle names any other global, or asks for
            an array or element type beyond plain numbers, bytes and str;
            nothing is called.
        DataFileError: If the pickle is truncated or malformed.
    """
    with open(path, "rb") as f:
        return _unpickle(f, os.fspath(path))


def loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """`load` for a pickle held in memory; ``source`` names it in error messages."""
    return _unpickle(io.BytesIO(data), source)
