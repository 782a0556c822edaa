"""Checkpoint files on disk: written whole or not at all, in their own folder and never through
$TMPDIR, and read only when their checksums hold. A damaged, truncated or unwritable checkpoint is
one line (lm/training/checkpoint_file.py's read_checkpoint, lm/training/checkpoint_io.py)."""

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.serialization import config as serialization_config

from lm.data.datamodule import PTBDataModule
from lm.errors import UserError
from lm.training.checkpoint import BestCheckpoint
from lm.training.checkpoint_file import read_checkpoint
from lm.training.checkpoint_io import WholeCheckpointIO
from lm.training.safe_stop import TrainingCheckpoint
from lm.training.trainer import build_trainer
from tests.conftest import TINY_RUN, compose_config, language_model, run_script, run_train, write_tiny_corpus

# Checkpoints of some 270 kB (hidden 64): far larger than the other files of a run folder.
RUN = [*TINY_RUN, "model.net.hidden_size=64"]
# A command that runs the next with files limited to argv[1] bytes: a write past it fails (EFBIG).
LIMIT_FILE_SIZE = (
    "import os, resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])"
)


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


def test_checkpoints_carry_checksums_even_where_torch_is_told_to_leave_them_out(tmp_path):
    with serialization_config.patch({"save.compute_crc32": False}):
        WholeCheckpointIO().save_checkpoint({"weights": torch.ones(100)}, tmp_path / "x.ckpt")
    with zipfile.ZipFile(tmp_path / "x.ckpt") as archive:
        assert all(record.CRC for record in archive.infolist() if record.file_size)


# --- writing: whole or not at all ----------------------------------------------------------------
REAL_SAVE = torch.save


def save_onto_a_full_disk(checkpoint: dict, file, *args, **kwargs) -> None:
    """torch.save onto a disk with 1000 bytes left: the write that passes them fails with ENOSPC."""

    class FullDisk:
        written = 0

        def write(self, data) -> int:
            if self.written + len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return file.write(data)

        def flush(self) -> None:
            file.flush()

    REAL_SAVE(checkpoint, FullDisk(), *args, **kwargs)


def project_trainer(root: Path, callbacks: list[Callback], **trainer: object):
    """The Trainer train.py builds (lm/training/trainer.py), small, on the CPU, without a logger."""
    overrides = [f"trainer.{key}={value}" for key, value in trainer.items()]
    cfg = compose_config(
        "trainer.accelerator=cpu",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"trainer.default_root_dir={root}",
        *overrides,
    )
    return build_trainer(cfg.trainer, callbacks=callbacks, logger=False)


def fit(trainer, tiny_corpus: Path, root: Path) -> None:
    datamodule = PTBDataModule(dir=tiny_corpus, cache_dir=root / "cache", url="file:///nowhere", batch_size=4)
    trainer.fit(language_model(datamodule.vocab_size, hidden_size=8), datamodule=datamodule)


def test_checkpoints_are_written_without_the_temporary_folder(tiny_corpus, tmp_path, monkeypatch):
    """Nothing goes through $TMPDIR: with no temporary folder at all the checkpoints are still written."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-temporary-folder"))
    checkpoints = tmp_path / "checkpoints"
    best = BestCheckpoint(checkpoints, filename="best", monitor="val/ppl", save_on_train_epoch_end=True)
    trainer = project_trainer(tmp_path, [best, TrainingCheckpoint(checkpoints)], max_epochs=1)
    fit(trainer, tiny_corpus, tmp_path)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert read_checkpoint(checkpoints / "last.ckpt", "ckpt_path")["epoch"] == 0


def test_a_full_disk_stops_training_in_one_line_and_keeps_the_last_good_checkpoint(
    tiny_corpus, tmp_path, monkeypatch
):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    checkpoints, saved = tmp_path / "checkpoints", {}

    class DiskFillsUpInTheSecondEpoch(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                saved.update({path.name: path.read_bytes() for path in checkpoints.iterdir()})
                monkeypatch.setattr(torch, "save", save_onto_a_full_disk)

    best = BestCheckpoint(dirpath=checkpoints, monitor="val/ppl", save_on_train_epoch_end=True)
    callbacks = [DiskFillsUpInTheSecondEpoch(), best, TrainingCheckpoint(checkpoints)]
    trainer = project_trainer(tmp_path, callbacks, max_epochs=2)
    with pytest.raises(UserError) as refused:
        fit(trainer, tiny_corpus, tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{checkpoints} could not take ")
    assert "(No space left on device): nothing of it was left there, and the last good checkpoint" in message
    assert message.endswith(f"Free space there (or make it writable), then go on with resume={tmp_path}.")
    last_good = Path(re.search(r"the last good checkpoint, (\S+), is intact", message)[1])
    assert last_good.name in saved and len(saved) == 2
    assert {path.name: path.read_bytes() for path in checkpoints.iterdir()} == saved  # no partial file
    for name in saved:
        assert read_checkpoint(checkpoints / name, "ckpt_path")["epoch"] == 0
    assert not list(temporary.iterdir())


def test_last_ckpt_is_replaced_whole_or_not_at_all(tiny_corpus, tmp_path, monkeypatch):
    checkpoints = TrainingCheckpoint(tmp_path / "checkpoints")
    trainer = project_trainer(tmp_path, [checkpoints], max_epochs=1)
    fit(trainer, tiny_corpus, tmp_path)
    good = checkpoints.last_path.read_bytes()
    monkeypatch.setattr(torch, "save", save_onto_a_full_disk)
    with pytest.raises(UserError, match="could not take last.ckpt"):
        checkpoints._save_last(trainer)
    assert [path.name for path in checkpoints.dirpath.iterdir()] == ["last.ckpt"]
    assert checkpoints.last_path.read_bytes() == good


@pytest.mark.parametrize(
    "processes",
    [[], ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"]],
    ids=["one process", "ddp_spawn"],
)
def test_a_run_that_cannot_write_a_checkpoint_ends_in_one_line(trained, tmp_path, processes):
    """Files limited to half a checkpoint: the first checkpoint write fails, as on a full disk; with
    ddp_spawn in a worker, whose error reaches the launcher as its traceback's text."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    run, limit = tmp_path / "run", trained["best"].stat().st_size // 2
    result = run_train(
        *RUN,
        *trained["data"],
        *processes,
        f"hydra.run.dir={run}",
        env={**os.environ, "TMPDIR": str(temporary)},
        prefix=(sys.executable, "-c", LIMIT_FILE_SIZE, str(limit)),
    )
    refused_in_one_line(
        result,
        f"{run / 'checkpoints'} could not take epoch00-",
        "(File too large): nothing of it was left there, and no checkpoint had been saved there yet. ",
        "then start the run again with overwrite=true.",
    )
    assert not list((run / "checkpoints").iterdir())
    # Nothing of a checkpoint in TMPDIR; torch's spawn leaves its workers' short error reports there.
    assert not [path for path in temporary.iterdir() if not path.name.startswith("pytorch-errorfile-")]


def unshare_refusal() -> str | None:
    """Why this machine cannot mount a small file system of its own (none: it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True
    )
    if probe.returncode == 0:
        return None
    return probe.stderr.strip() or f"unshare exited with status {probe.returncode}"


def test_a_run_whose_folder_fills_up_ends_in_one_line_and_resumes_once_there_is_space(trained, tmp_path):
    """The run folder on a real file system too small for epoch 2's checkpoints, in a user and mount
    namespace (no root needed); the folder is copied out before that file system goes away."""
    refusal = unshare_refusal()
    if refusal:
        pytest.skip(f"cannot mount a small tmpfs without root here: {refusal}")
    disk, temporary, copy = tmp_path / "disk", tmp_path / "tmp", tmp_path / "run"
    disk.mkdir()
    temporary.mkdir()
    # Epoch 1's two checkpoints and the small files fit; a third checkpoint, while two stand, does not.
    size = (5 * trained["best"].stat().st_size // 2 + 64 * 1024) // 4096 * 4096
    script = (
        f'mount -t tmpfs -o size={size} tmpfs "{disk}" && "$@"; status=$?; '
        f'cp -a "{disk}/run" "{copy}"; exit $status'
    )
    result = run_train(
        *RUN,
        *trained["data"],
        f"hydra.run.dir={disk / 'run'}",
        env={**os.environ, "TMPDIR": str(temporary)},
        prefix=("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"),
    )
    checkpoints = disk / "run" / "checkpoints"
    refused_in_one_line(
        result,
        f"{checkpoints} could not take ",
        "(No space left on device): nothing of it was left there, and the last good checkpoint, ",
        f"checkpoint, {checkpoints}/",
        f"then go on with resume={disk / 'run'}.",
    )
    assert "Logging error" not in result.stderr
    assert not list(temporary.iterdir())
    kept = sorted(path.name for path in (copy / "checkpoints").iterdir())
    assert len(kept) == 2 and "last.ckpt" in kept  # epoch 1's, no partial file
    assert read_checkpoint(copy / "checkpoints" / "last.ckpt", "resume")["epoch"] == 0

    resumed = run_train(*RUN, *trained["data"], f"resume={copy}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert read_checkpoint(copy / "checkpoints" / "last.ckpt", "resume")["epoch"] == 1
