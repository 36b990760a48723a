"""Checkpoints that are written atomically and loaded without running code.

    save_checkpoint("runs/x/checkpoint.pt", payload)   # temp file + fsync + os.replace
    payload = load_checkpoint("runs/x/checkpoint.pt")  # torch.load(weights_only=True)

The payload is plain data: dict, list, tuple, str, bytes, int, float, bool, None, tensors,
torch.Size/dtype/device (what torch.load(weights_only=True) accepts). save_checkpoint checks
that before writing and names the offending key, so a checkpoint that could not be loaded safely
is never written. On disk the payload sits in an envelope {"format": "fracfx-checkpoint",
"version": N, "sha256": digest, "payload": ...}; load_checkpoint checks the digest (torch does not
check the zip's CRCs, so a flipped byte in tensor data would otherwise load silently) and returns
the payload.

A crash at any moment leaves either the previous checkpoint or the new one, never a torn file:
the bytes go to a temporary file in the same folder, are fsynced, and os.replace()d over the
target (then the folder is fsynced, where the OS allows).
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import secrets
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from fracfx.errors import CheckpointError

FORMAT = "fracfx-checkpoint"
VERSION = 1

_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)
_PLAIN_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN_SCALARS):
        return
    if type(value) in _PLAIN_MAPPINGS:
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None), tuple)):
                raise CheckpointError(f"checkpoint key {where}[{key!r}] has type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}, which "
        f"torch.load(weights_only=True) refuses; convert it to plain data (dict/list/number/str) or a tensor"
    )


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` to `path` atomically; return the path."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"a checkpoint payload must be a dict, got {type(payload).__name__}")
    _check_plain(payload, "payload")
    envelope = {"format": FORMAT, "version": VERSION, "sha256": payload_digest(payload), "payload": payload}
    return atomic_write(path, lambda handle: torch.save(envelope, handle))


def payload_digest(payload: Any) -> str:
    """SHA-256 over the payload's structure, plain values and tensor bytes.

    torch's zip reader does not check CRCs, so a flipped byte inside tensor data would load as a
    silently wrong weight; load_checkpoint recomputes this digest to catch that.
    """
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        text = repr(value).encode()
        digest.update(f"S{type(value).__name__}{len(text)}:".encode() + text)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(handle) on a temporary file beside `path`, fsync it, then os.replace it over `path`.

    The file gets the usual permissions (0666 less the umask), as if opened with open(path, "wb").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(100):
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise CheckpointError(f"could not create a temporary file beside {path}")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _refusal_detail(error: Exception) -> str:
    """The specific reason inside torch's long weights_only message (which advises weights_only=False)."""
    details = []
    for line in str(error).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please file an issue")):
            details.append(line)
    return "; ".join(details) or type(error).__name__


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by save_checkpoint and return its payload.

    Raises CheckpointError when the file is missing, truncated, corrupt, contains anything but
    plain data and tensors (e.g. a pickle that would run code), or is not a fracfx checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; pass the checkpoint file (e.g. RUN_DIR/checkpoint.pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted copy?); use an earlier checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            envelope = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was refused by the safe loader: it holds objects other than plain data and tensors, "
            f"or is not a torch checkpoint at all; fracfx never unpickles such files because that can run "
            f"code ({_refusal_detail(error)})"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        found = sorted(map(str, envelope))[:5] if isinstance(envelope, dict) else type(envelope).__name__
        raise CheckpointError(
            f"{path} is not a fracfx checkpoint (no format={FORMAT!r} marker; found {found}); "
            f"fracfx resumes only from checkpoints that `fracfx train` wrote"
        )
    version = envelope.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this fracfx reads up to {VERSION}, upgrade fracfx")
    payload = envelope.get("payload")
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} has no payload dict; it is damaged")
    if envelope.get("sha256") != payload_digest(payload):
        raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum written with them; use an earlier checkpoint")
    return payload
