"""Read and write the safetensors format: named tensors and string metadata, no code.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``) and the tensors'
little-endian bytes, each at its offsets from the end of the header. Unlike a pickle, reading one can only
yield tensors, so it is the format for sharing weights with strangers. Files written here load with the
``safetensors`` package (``safetensors.torch.load_file``) and the other way round.

Every header is checked before a tensor is read: the file must hold exactly the bytes the header names, the
tensors must tile the data without gaps or overlaps, and every size must match its dtype and shape. Any
problem raises :class:`SafetensorsError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .io import atomic_write

__all__ = ["SafetensorsError", "is_safetensors", "read_safetensors", "write_safetensors"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
# The reference implementation refuses headers above 100 MB; a header is a few hundred bytes per tensor.
MAX_HEADER = 100_000_000
_METADATA = "__metadata__"


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file; the message names the file."""


def is_safetensors(path: str | os.PathLike) -> bool:
    """True when the file starts like a safetensors file (a plausible header length, then a JSON object)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    size = struct.unpack("<Q", head[:8])[0]
    return head[8:9] == b"{" and 2 <= size <= MAX_HEADER


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) to ``path`` atomically."""
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; offending keys {bad}")
        header[_METADATA] = dict(metadata)
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors code (supported: {sorted(DTYPES)})")
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise TypeError(f"{name}: only dense tensors can be written")
        data = _to_bytes(tensor)
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for data in blobs:
            fh.write(data)
    return path


def _to_bytes(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    if sys.byteorder != "little" and t.element_size() > 1:
        raise OSError("writing safetensors needs a little-endian machine")
    # Viewed as bytes so that bfloat16 (which numpy lacks) goes through the same path.
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, every header field checked before any tensor is made."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header, start = _read_header(path, fh, size)
            entries, metadata = _check_header(path, header, size - start)
            data = bytearray(size - start)
            if fh.readinto(data) != len(data):
                raise SafetensorsError(f"{path}: the file shrank while it was read")
    except OSError as error:
        raise SafetensorsError(f"{path}: cannot be read ({error})") from error
    return {name: _tensor(data, *entry) for name, entry in entries.items()}, metadata


def _read_header(path: Path, fh, size: int) -> tuple[dict, int]:
    if size < 8:
        raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file (no header length)")
    length = struct.unpack("<Q", fh.read(8))[0]
    if length > MAX_HEADER or length > size - 8:
        raise SafetensorsError(f"{path}: the header claims {length} bytes but the file holds {size - 8} after its "
                               f"length field (limit {MAX_HEADER}); the file is truncated or not safetensors")
    try:
        header = json.loads(fh.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: the header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    return header, 8 + length


def _check_header(path: Path, header: dict, data_size: int) -> tuple[dict, dict[str, str]]:
    """``{name: (dtype, shape, begin, end)}`` sorted by offset, and the metadata; SafetensorsError on any flaw."""
    metadata = header.pop(_METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: {_METADATA} must map strings to strings")
    entries = {name: _check_entry(path, name, entry) for name, entry in header.items()}
    expected = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != expected:
            raise SafetensorsError(f"{path}: tensor {name!r} starts at byte {begin}, expected {expected}: the "
                                   "tensors overlap or leave a gap")
        expected = end
    if expected != data_size:
        raise SafetensorsError(f"{path}: the tensors take {expected} bytes, the file holds {data_size} after the "
                               "header; it is truncated or has trailing data")
    return entries, metadata


def _check_entry(path: Path, name: str, entry) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"{where}: expected {{dtype, shape, data_offsets}}, got {entry!r:.200}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise SafetensorsError(f"{where}: unsupported dtype {dtype!r} (supported: {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(_natural(n) for n in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got "
                               f"{offsets!r:.200}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(f"{where}: {dtype} {tuple(shape)} needs {nbytes} bytes, its offsets span "
                               f"{offsets[1] - offsets[0]}")
    return DTYPES[dtype], tuple(shape), offsets[0], offsets[1]


def _natural(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _tensor(data: bytearray, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> torch.Tensor:
    if begin == end:
        return torch.empty(shape, dtype=dtype)
    if sys.byteorder != "little" and dtype.itemsize > 1:
        raise OSError("reading safetensors needs a little-endian machine")
    # Bytes first, then the dtype: frombuffer with a dtype needs the offset aligned to the element size.
    raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin).clone()
    return raw.view(dtype).reshape(shape)
