"""Reader (and writer, for tests) of the IDX format of the original MNIST distribution.

An IDX file is a big-endian header followed by a raw C-order array:

    bytes 0-1   zero
    byte  2     type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
                0x0E float64)
    byte  3     number of dimensions ``d``
    4*d bytes   one big-endian uint32 per dimension
    ...         prod(dims) * itemsize bytes of data

The first four bytes read as one big-endian integer are the "magic number" ``type << 8 | d``:
2051 (``0x00000803``) for MNIST's uint8 ``[N, 28, 28]`` images, 2049 (``0x00000801``) for its
labels. Files may be gzip-compressed (detected from the gzip magic bytes, not the name). Every
check is strict: a wrong magic number, an unexpected type, rank or shape, a corrupt gzip stream or
a size that does not match the header is a :class:`jaxdiff.validation.InvalidFileError` (a
``ValueError``) naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional, Sequence

import numpy as np

from jaxdiff.validation import InvalidFileError

__all__ = ["read_idx", "write_idx", "IDX_DTYPES"]

IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        raw = f.read()
    if head == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # truncated / corrupt gzip stream
            raise InvalidFileError(f"{path}: truncated or corrupt gzip file ({len(raw)} bytes; "
                                   f"{e})") from None
    return raw


def read_idx(
    path: str,
    *,
    expected_dtype: Optional[np.dtype] = None,
    expected_ndim: Optional[int] = None,
    expected_shape: Optional[Sequence[Optional[int]]] = None,
) -> np.ndarray:
    """Reads one IDX file (gzipped or not) into a numpy array of its native dtype.

    Args:
      path: the file.
      expected_dtype: if given, the type byte must decode to this dtype (e.g. ``np.uint8``).
      expected_ndim: if given, the header's number of dimensions must equal it.
      expected_shape: if given, each non-``None`` entry must equal the header's dimension.

    Returns:
      An array of shape ``dims`` from the header (native byte order).

    Raises:
      FileNotFoundError: the file does not exist.
      jaxdiff.validation.InvalidFileError: (a ``ValueError``) a bad magic number (with
        ``expected_dtype`` and ``expected_ndim`` both given, the message says which one was
        expected, e.g. 2051), an unknown type, an unexpected dtype/rank/shape, a corrupt gzip
        stream, or a data size that does not match the header (truncated or padded file). The
        message names the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    codes = {v.newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    want_magic = None  # the magic number that the expected dtype and rank make
    if expected_dtype is not None and expected_ndim is not None:
        code = codes.get(np.dtype(expected_dtype).newbyteorder("="))
        want_magic = None if code is None else code << 8 | expected_ndim
    if len(data) < 4:
        raise InvalidFileError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if want_magic is not None and magic != want_magic:
        raise InvalidFileError(
            f"{path}: IDX magic number {magic} (0x{magic:08x}), expected {want_magic} "
            f"(0x{want_magic:08x}: {np.dtype(expected_dtype)}, {expected_ndim} dimensions)"
        )
    if data[0] != 0 or data[1] != 0:
        raise InvalidFileError(f"{path}: bad IDX magic number {magic} (0x{magic:08x}): the first "
                               "two bytes must be zero")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise InvalidFileError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    dtype = IDX_DTYPES[type_code]
    if expected_dtype is not None and dtype.newbyteorder("=") != np.dtype(expected_dtype):
        raise InvalidFileError(f"{path}: IDX data type is {dtype}, expected "
                               f"{np.dtype(expected_dtype)}")
    if ndim == 0:
        raise InvalidFileError(f"{path}: IDX header declares zero dimensions")
    if expected_ndim is not None and ndim != expected_ndim:
        raise InvalidFileError(f"{path}: IDX file has {ndim} dimensions, expected "
                               f"{expected_ndim}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise InvalidFileError(f"{path}: truncated IDX header ({len(data)} bytes, the header of "
                               f"{ndim} dimensions takes {header_len})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if expected_shape is not None:
        for i, (got, want) in enumerate(zip(dims, expected_shape)):
            if want is not None and got != want:
                raise InvalidFileError(f"{path}: IDX dimension {i} is {got}, expected {want} "
                                       f"(shape {dims})")
    expected_bytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected_bytes:
        kind = "truncated" if actual < expected_bytes else "has trailing bytes"
        raise InvalidFileError(
            f"{path}: IDX file {kind}: its header's shape {dims} needs {expected_bytes} data "
            f"bytes, got {actual}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header_len)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str, array: np.ndarray, *, compress: Optional[bool] = None) -> None:
    """Writes ``array`` as an IDX file; gzip-compressed if ``compress`` (default: name ends
    ``.gz``)."""
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    dt = array.dtype.newbyteorder("=")
    if dt not in codes:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    header = bytes([0, 0, codes[dt], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(IDX_DTYPES[codes[dt]]).tobytes()
    if compress is None:
        compress = path.endswith(".gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(payload, mtime=0) if compress else payload)
