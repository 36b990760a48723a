"""Checkpoints that are written atomically and loaded without running code.

    save_checkpoint("runs/x/checkpoint.pt", payload)   # temp file + fsync + os.replace
    payload = load_checkpoint("runs/x/checkpoint.pt")  # torch.load(weights_only=True)

The payload is plain data: dict, list, tuple, str, bytes, int, float, bool, None, tensors,
torch.Size/dtype/device (what torch.load(weights_only=True) accepts). save_checkpoint checks
that before writing and names the offending key, so a checkpoint that could not be loaded safely
is never written. On disk the payload sits in an envelope {"format": "fracfx-checkpoint",
"version": N, "payload": ...}; load_checkpoint returns the payload.

A crash at any moment leaves either the previous checkpoint or the new one, never a torn file:
the bytes go to a temporary file in the same folder, are fsynced, and os.replace()d over the
target (then the folder is fsynced, where the OS allows).
"""

from __future__ import annotations

import collections
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

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
    path = Path(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"a checkpoint payload must be a dict, got {type(payload).__name__}")
    _check_plain(payload, "payload")
    path.parent.mkdir(parents=True, exist_ok=True)
    envelope = {"format": FORMAT, "version": VERSION, "payload": payload}
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(envelope, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        try:
            os.unlink(handle.name)
        except FileNotFoundError:
            pass
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
        envelope = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} was refused by the safe loader: it holds objects other than plain data and tensors "
            f"(or is not a torch file at all), and fracfx never unpickles those because that can run code ({first})"
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
    return payload
