"""runtime.checkpoint: atomic writes, safe loads, and a clear CheckpointError for every bad file."""

from __future__ import annotations

import collections
import os
import pickle
import random

import numpy as np
import pytest
import torch

from fracfx.errors import CheckpointError, FracfxError
from fracfx.runtime.checkpoint import FORMAT, VERSION, atomic_write, load_checkpoint, save_checkpoint


class _RunsCode:
    """Unpickling this with plain pickle calls os.mkdir(marker): code execution, made visible."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _payload():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [10, 20])
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "generator": {"device": "cpu", "state": torch.Generator().manual_seed(3).get_state()},
        "metrics": [{"iteration": 8, "test_acc": 12.5, "stage": None, "bits": {"act": 3}}],
        "iteration": 8,
        "nested": collections.OrderedDict(a=(1, 2.0, "x", b"y", None, True)),
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_round_trip_keeps_every_value(tmp_path):
    payload = _payload()
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", payload)
    assert path == tmp_path / "run" / "checkpoint.pt"
    loaded = load_checkpoint(path)
    assert _same(payload, loaded)
    assert type(loaded["lr_schedule"]["milestones"]) is collections.Counter  # MultiStepLR keeps loading


def test_written_atomically_no_temp_files_left_normal_permissions(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})
    save_checkpoint(path, {"iteration": 2})
    assert load_checkpoint(path)["iteration"] == 2
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})

    def explode(handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, explode)
    assert load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_non_plain_payload_is_refused_before_writing(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match=r"payload\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_checkpoint(path, {"rng": {"numpy": np.zeros(3)}})
    with pytest.raises(CheckpointError, match="_RunsCode"):
        save_checkpoint(path, {"x": [_RunsCode(tmp_path / "m")]})
    with pytest.raises(CheckpointError, match="must be a dict"):
        save_checkpoint(path, [1, 2])
    assert not path.exists()


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, keep):
    path = save_checkpoint(tmp_path / "c.pt", _payload())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_corrupt_bytes(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _payload())
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "noise.pt")


def test_not_a_fracfx_checkpoint(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a fracfx checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a fracfx checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def test_newer_version_asks_for_an_upgrade(tmp_path):
    torch.save({"format": FORMAT, "version": VERSION + 1, "payload": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="upgrade fracfx"):
        load_checkpoint(tmp_path / "future.pt")


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, container):
    marker = tmp_path / "code-ran"
    evil = {"format": FORMAT, "version": VERSION, "payload": {"model": _RunsCode(marker)}}
    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    # The file really is live: an unsafe load would run the code ...
    with open(path, "rb") as handle:
        torch.load(handle, weights_only=False) if container == "torch.save" else pickle.load(handle)
    assert marker.is_dir()
    marker.rmdir()
    # ... and load_checkpoint refuses it without running anything.
    with pytest.raises(CheckpointError, match="refused by the safe loader") as info:
        load_checkpoint(path)
    assert not marker.exists()
    assert "weights_only=False" not in str(info.value)  # we never advise the unsafe way out
    assert isinstance(info.value, FracfxError)


def test_flipped_byte_in_tensor_data_is_caught_by_the_checksum(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"weight": torch.full((256,), 0.75)})
    data = bytearray(path.read_bytes())
    pattern = torch.tensor([0.75]).numpy().tobytes() * 4
    where = data.find(pattern)
    assert where > 0
    data[where + 1] ^= 0x01  # torch's zip reader does not check CRCs: this would load silently
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(path)
