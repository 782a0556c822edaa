"""Checkpoint files on disk: read only when their checksums hold. A damaged or truncated
checkpoint is one line (lm/training/checkpoint.py's read_checkpoint)."""

import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.serialization import config as serialization_config

from lm.training.checkpoint import read_checkpoint
from tests.conftest import TINY_RUN, run_script, run_train, write_tiny_corpus

# Checkpoints of some 270 kB (hidden 64): far larger than the other files of a run folder.
RUN = [*TINY_RUN, "model.net.hidden_size=64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A real run of one epoch: its folder, its best checkpoint, and what the tools need."""
    root = tmp_path_factory.mktemp("checkpoint-files")
    corpus = write_tiny_corpus(root / "tiny")
    data = [f"data.dir={corpus}", f"data.cache_dir={root / 'cache'}"]
    result = run_train(*RUN, "trainer.max_epochs=1", *data, f"hydra.run.dir={root / 'run'}")
    assert result.returncode == 0, result.stdout + result.stderr
    (root / "lines.txt").write_text("the cat sat\n")
    (best,) = (root / "run" / "checkpoints").glob("epoch*.ckpt")
    return {"root": root, "run": root / "run", "best": best, "data": data, "corpus": corpus}


def rot(checkpoint: Path) -> None:
    """Flip 64 bytes in the middle of the checkpoint's largest tensor, as bytes rot on disk: torch.load
    still reads it, with other weights."""
    before = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        largest = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
        start = data.index(archive.read(largest)) + largest.file_size // 2
    data[start : start + 64] = bytes(byte ^ 0xFF for byte in data[start : start + 64])
    checkpoint.write_bytes(data)
    after = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert any(not torch.equal(before[name], after[name]) for name in before)  # it loads, changed


def truncate(checkpoint: Path) -> None:
    """Cut the checkpoint in half, as a copy or a write cut short leaves it."""
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])


def refused_in_one_line(result: subprocess.CompletedProcess, *parts: str) -> str:
    """Status 1, and the log's last line is the error, all of it (none of torch's text below it)."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "PytorchStreamReader" not in output, output
    last = result.stdout.rstrip("\n").splitlines()[-1]
    assert "[ERROR] - " in last and all(part in last for part in parts), output
    return last


TOOLS = {
    "evaluate.py": ["data.dir={corpus}"],
    "score.py": ["file={root}/lines.txt"],
    "generate.py": ["prompt=the"],
}
DAMAGES = {
    "rotted": (rot, "is damaged: its bytes changed on disk since it was saved"),
    "truncated": (truncate, "is truncated or damaged: it is not a whole checkpoint"),
}
FIX = "It was not loaded: use another checkpoint of the run"


@pytest.mark.parametrize("damage", DAMAGES)
def test_resuming_a_damaged_checkpoint_is_refused_in_one_line(trained, damage, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    damaged, (spoil, what) = run / "checkpoints" / "last.ckpt", DAMAGES[damage]
    spoil(damaged)
    result = run_train(*RUN, "trainer.max_epochs=2", *trained["data"], f"resume={run}")
    refused_in_one_line(result, f"resume={damaged} {what}", FIX, "resume=<run folder>/checkpoints/")


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("script", TOOLS)
def test_the_tools_refuse_a_damaged_checkpoint_in_one_line(trained, script, damage, tmp_path):
    damaged, (spoil, what) = tmp_path / "damaged.ckpt", DAMAGES[damage]
    shutil.copy(trained["best"], damaged)
    spoil(damaged)
    overrides = [o.format(root=trained["root"], corpus=trained["corpus"]) for o in TOOLS[script]]
    result = run_script(script, f"ckpt_path={damaged}", *overrides, f"hydra.run.dir={tmp_path / 'out'}")
    refused_in_one_line(result, f"ckpt_path={damaged} {what}", FIX)


def test_a_checkpoint_without_checksums_loads_with_a_warning(trained, tmp_path, caplog):
    """As torch.save writes it with compute_crc32 off: every record's CRC-32 is 0."""
    unchecked = tmp_path / "unchecked.ckpt"
    original = torch.load(trained["best"], map_location="cpu", weights_only=True)
    with serialization_config.patch({"save.compute_crc32": False}):
        torch.save(original, unchecked)
    with caplog.at_level(logging.WARNING):
        loaded = read_checkpoint(unchecked, "ckpt_path")
    assert f"ckpt_path={unchecked} carries no checksums" in caplog.text
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in original["state_dict"].items())
