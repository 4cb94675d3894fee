"""Files we write and read back: unique temporary names, atomic replacement, and safetensors
files that carry a CRC-32 of every tensor in their metadata, checked when read.

Every file is written under a temporary name beside its target, ``.NAME.partial-PID-RANDOM``
(so two processes never share one, and a leftover names the process that left it, see
``partial_owner``), flushed to disk, then renamed over the target. The checksums sit in the
free-form safetensors metadata (key ``unipruning.crc32``: a JSON object tensor -> 8 hex
digits), which safetensors, compressed-tensors and vLLM ignore. CRC-32 finds accidental damage
(a flipped or moved bit, a truncated or swapped tensor) at ~4 GB/s; it is no defence against
deliberate edits, which could rewrite the metadata as well.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = [
    "CHECKSUM_KEY",
    "DamagedFileError",
    "atomic_write",
    "check_header",
    "checksums",
    "partial_owner",
    "partial_sibling",
    "read_safetensors",
    "recorded_checksums",
    "verify_tensor",
    "write_safetensors",
]

CHECKSUM_KEY = "unipruning.crc32"
PARTIAL = ".partial-"
_HEADER_LIMIT = 100 * 2**20  # safetensors refuses larger headers too
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class DamagedFileError(ValueError):
    """A file that is truncated, has a broken header, or whose tensors fail their checksum."""


def partial_sibling(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary name beside ``path``: ``.NAME.partial-PID-RANDOM`` + ``suffix``."""
    path = Path(path)
    return path.parent / f".{path.name}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def partial_owner(name: str, target: str) -> int | None:
    """The PID in a ``partial_sibling`` name of ``target`` (a file name), or None if it is not one."""
    prefix = f".{target}{PARTIAL}"
    if not name.startswith(prefix):
        return None
    pid = name[len(prefix):].partition("-")[0]
    return int(pid) if pid.isdigit() else None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename it over ``path``: readers see the old file or the whole new one.

    The new file keeps the permissions of the file it replaces; the temporary file is removed
    when ``write`` fails (a full disk, an interrupt).
    """
    path = Path(path)
    partial = partial_sibling(path)
    try:
        write(partial)
        if path.exists():
            os.chmod(partial, path.stat().st_mode)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _crc(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    return f"{zlib.crc32(data.view(torch.uint8).numpy()):08x}"


def checksums(tensors: Mapping[str, torch.Tensor]) -> str:
    """The JSON value of ``CHECKSUM_KEY``: CRC-32 of each tensor's stored bytes."""
    return json.dumps({name: _crc(tensor) for name, tensor in sorted(tensors.items())}, separators=(",", ":"))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with checksums in the metadata, written atomically."""
    from safetensors.torch import save_file

    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    meta = {**(metadata or {"format": "pt"}), CHECKSUM_KEY: checksums(tensors)}
    atomic_write(path, lambda partial: save_file(tensors, str(partial), metadata=meta))


def check_header(path: str | os.PathLike) -> dict:
    """The safetensors header of ``path`` (tensor entries and ``__metadata__``), after checking
    that it parses and that every tensor lies inside the file: DamagedFileError naming the file
    otherwise (safetensors' own errors, e.g. "incomplete metadata", do not name it)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise DamagedFileError(f"{path}: {size} bytes, too short for a safetensors file")
        length = struct.unpack("<Q", raw)[0]
        if length > min(_HEADER_LIMIT, size - 8):
            raise DamagedFileError(f"{path}: header of {length} bytes announced, the file has {size} (truncated or not safetensors)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError) as error:
            raise DamagedFileError(f"{path}: the safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path}: the safetensors header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            expected = _ITEM_BYTES[entry["dtype"]]
            for dim in entry["shape"]:
                expected *= dim
        except (KeyError, TypeError, ValueError):
            raise DamagedFileError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if stop - begin != expected:
            raise DamagedFileError(f"{path}: tensor {name!r} spans {stop - begin} bytes, its dtype and shape need {expected}")
        end = max(end, stop)
    if 8 + length + end != size:
        raise DamagedFileError(f"{path}: the header describes {8 + length + end} bytes, the file has {size} (truncated or damaged)")
    return header


def recorded_checksums(path: str | os.PathLike, metadata: Mapping[str, str] | None, names) -> dict[str, str] | None:
    """The file's CRC-32 per tensor (None for files without them, e.g. written by other tools);
    DamagedFileError when they do not cover exactly the tensors ``names`` of the file."""
    recorded = (metadata or {}).get(CHECKSUM_KEY)
    if recorded is None:
        return None
    try:
        expected = json.loads(recorded)
    except ValueError:
        expected = None
    if not isinstance(expected, dict):
        raise DamagedFileError(f"{path}: metadata {CHECKSUM_KEY} is not a JSON object")
    if sorted(expected) != sorted(names):
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        raise DamagedFileError(f"{path}: tensors differ from those checksummed (missing {missing[:3]}, unlisted {extra[:3]})")
    return expected


def verify_tensor(path: str | os.PathLike, name: str, tensor: torch.Tensor, recorded: Mapping[str, str] | None) -> None:
    """DamagedFileError naming the tensor when its bytes differ from its recorded CRC-32."""
    if recorded is not None and _crc(tensor) != recorded[name]:
        raise DamagedFileError(f"{path}: tensor {name!r} fails its checksum (the file was damaged after it was written)")


def read_safetensors(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; checksums verified when present and ``verify``."""
    from safetensors.torch import load_file

    header = check_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type
        raise DamagedFileError(f"{path}: cannot be read ({error})") from None
    metadata = header.get("__metadata__") or {}
    if verify:
        recorded = recorded_checksums(path, metadata, tensors)
        for name, tensor in tensors.items():
            verify_tensor(path, name, tensor, recorded)
    return tensors, metadata
