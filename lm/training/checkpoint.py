"""What a checkpoint holds, who writes each part, and reading one safely (docs/design.md,
"Interruptions").

A checkpoint is the dict Lightning's `trainer.save_checkpoint` writes:

    state_dict           the network's weights (with NT-ASGD: the average, see training_state_dict),
                         the training perplexity's sums of the epoch so far, the average's state
    optimizer_states     SGD's state                                              (Lightning)
    loops, epoch, global_step, ...   where training is, to the window            (Lightning)
    hyper_parameters     LanguageModel's arguments, to build it again             (Lightning)
    callbacks            TrainingCheckpoint: the random generators (`random_state`), the run's wall time;
                         BestCheckpoint: the best scores; TokensPerSecond: tokens and seconds
    validation_metrics   the last validation's values, which the epoch's end ranks (TrainingCheckpoint)

and what the LightningModule adds, all in `save_module_state` below:

    vocabulary           the tokens and tokenisation: using a model never needs its data
    train_state          the carried state of every stream, for a resume in the middle of an epoch
    train_ppl_by_rank    each rank's training sums (several processes only)
    run_config           train.py's whole configuration, which a resume must repeat
    asgd                 NT-ASGD's validation history and switch epoch (lm/training/averaging.py)
    training_state_dict  the raw weights training goes on from, once weights are averaged

Every entry is a tensor or a plain value, so `read_checkpoint` unpickles with weights_only=True,
and only once the file's checksums hold. Writing one whole or not at all is the Trainer's
CheckpointIO's (lm/training/checkpoint_io.py).
"""

import dataclasses
import logging
import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lm.data.vocabulary import Vocabulary
from lm.errors import UserError
from lm.models.lstm import LSTMOptions
from lm.models.network import map_state
from lm.training.lightning_private import attached_trainer

log = logging.getLogger(__name__)

ZIP_SIGNATURE = b"PK\x03\x04"  # how a zip archive, torch.save's format since torch 1.6, begins
DOS_FOLDER = 0x10  # a record's folder bit: torch writes none, and reads such a record as empty


def read_checkpoint(path: Path, key: str) -> dict:
    """A checkpoint's contents, unpickled by `torch.load(weights_only=True)`: tensors and plain values
    only, which is all the project writes, so that a checkpoint someone handed over cannot run code;
    and only once its checksums hold. `key` names the option that gave the path (resume, ckpt_path)
    in the one-line refusal of a damaged, truncated or unsafe file; torch's or zipfile's own account
    goes to the log at debug level (hydra.verbose=lm shows it)."""
    path = Path(path)
    checked = _checksums_hold(path, key)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_checkpoint(path, key, error) from None
    except Exception as error:  # what no checksum guards: a file without any, or one torch cannot parse
        log.debug("torch.load(%s) failed", path, exc_info=error)
        raise _damaged(path, key, "is truncated or damaged: it is not a whole checkpoint") from None
    if not checked:
        log.warning(
            "%s=%s carries no checksums (written with torch's compute_crc32 off, or by a torch before 1.6): "
            "it was loaded unchecked, and damage to its bytes would go unnoticed.",
            key,
            path,
        )
    return checkpoint


def _checksums_hold(path: Path, key: str) -> bool:
    """Whether `path` carries checksums (refused in one line when one does not hold).

    torch.save writes a zip archive whose every record (the pickle, each tensor's bytes) carries a
    CRC-32, but torch.load reads them unchecked: bytes that rotted on disk load as other weights.
    Python's zipfile checks each record's CRC-32; damage to the archive's own structure (its
    headers, its directory, its end, which a truncated file lacks) fails there too, but for the
    folder bit, which zipfile ignores and torch does not (it leaves that tensor uninitialised). A
    file of another format, or whose records all carry 0 (no CRC computed), has nothing to check."""
    try:
        with open(path, "rb") as file:
            if file.read(len(ZIP_SIGNATURE)) != ZIP_SIGNATURE:
                return False  # not a zip archive: torch's legacy format, or no checkpoint (torch.load tells)
            try:
                with zipfile.ZipFile(file) as archive:
                    records = archive.infolist()
                    if not any(record.CRC for record in records):
                        return False
                    folders = (record.filename for record in records if record.external_attr & DOS_FOLDER)
                    failed = archive.testzip() or next(folders, None)
            except Exception as error:  # BadZipFile, EOFError, ...: the archive's structure is broken
                log.debug("zipfile could not read %s", path, exc_info=error)
                raise _damaged(path, key, "is truncated or damaged: it is not a whole checkpoint") from None
    except OSError as error:  # permission denied, a folder, an I/O error
        raise UserError(f"{key}={path} cannot be read ({error.strerror or error}).") from None
    if failed is not None:
        raise _damaged(
            path,
            key,
            f"is damaged: its bytes changed on disk since it was saved (its record {failed} no longer "
            "matches the CRC-32 or the entry written with it), so it would load other numbers",
        )
    return True


def _damaged(path: Path, key: str, what: str) -> UserError:
    return UserError(
        f"{key}={path} {what}. It was not loaded: use another checkpoint of the run, "
        f"{key}=<run folder>/checkpoints/<file>.ckpt (its last.ckpt or an epoch*.ckpt)."
    )


def unsafe_checkpoint(path: Path, key: str, error: Exception) -> UserError:
    """The refusal of a checkpoint that holds more than tensors and plain values (torch's own
    message is a page long); what it holds is named when torch says."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f"a reference to {found.group(1)}" if found else "an object"
    return UserError(
        f"{key}={path} holds {what}, not only tensors and plain values, and unpickling it could run code: "
        "it was not opened. Use a checkpoint written by this project's train.py, from a source you trust."
    )


def network_node(checkpoint: dict) -> dict:
    """The network's options node (model.net) of a checkpoint. Up to 3217f87 the LSTM's options were
    the module's own arguments, beside the training options."""
    hyper_parameters = checkpoint["hyper_parameters"]
    if "net" in hyper_parameters:
        return hyper_parameters["net"]
    return {"_target_": "lm.models.lstm.LSTMOptions", **_lstm_options_of(hyper_parameters)}


def run_config_now(run_config: dict) -> dict:
    """A checkpoint's run configuration in today's layout: up to 3217f87 the LSTM's options were
    model.*, not model.net.*."""
    model = dict(run_config.get("model", {}))
    if model and "net" not in model:
        model["net"] = _lstm_options_of(model)
        model = {key: value for key, value in model.items() if key not in model["net"]}
    return {**run_config, "model": model}


def _lstm_options_of(options: dict) -> dict:
    names = {field.name for field in dataclasses.fields(LSTMOptions)}
    return {key: value for key, value in options.items() if key in names}


def save_module_state(module: L.LightningModule, checkpoint: dict) -> None:
    """The LightningModule's entries (called on every rank: the gathers need them all)."""
    if module.vocabulary is not None:
        checkpoint["vocabulary"] = module.vocabulary.state_dict()
    checkpoint["train_state"] = _all_ranks_state(module)
    trainer = attached_trainer(module)
    if trainer is not None and trainer.world_size > 1:  # each rank's sums of the epoch so far
        sums = torch.stack([module.train_ppl.nll_sum, module.train_ppl.count])
        checkpoint["train_ppl_by_rank"] = module.all_gather(sums)  # (ranks, 2)
    if module.run_config is not None:
        checkpoint["run_config"] = module.run_config
    module.averaging.save(checkpoint)


def load_module_state(module: L.LightningModule, checkpoint: dict) -> None:
    """Before Lightning loads `checkpoint["state_dict"]` into the module: its vocabulary (refused
    when resuming on other data), the averaging, this rank's sums and carried state."""
    trainer = attached_trainer(module)
    fitting = trainer is not None and trainer.state.fn == "fit"
    if "vocabulary" in checkpoint:  # none when the module was trained without a datamodule that has one
        saved = Vocabulary.from_state_dict(checkpoint["vocabulary"])
        if fitting and module.vocabulary is not None and saved != module.vocabulary:
            raise UserError(
                f"resume: the checkpoint's vocabulary ({len(saved)} types) is not the one of the data "
                f"now ({len(module.vocabulary)}): data.dir or its files changed since the run began. "
                "Resume with the run's own data, or start a new run."
            )
        module.vocabulary = saved
    module.averaging.load(checkpoint, module.net, fitting)
    world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
    _restore_training_sums(checkpoint, world, rank)
    state = checkpoint.get("train_state")
    if state is not None and world > 1:
        rows = state[0][0].size(1) // world  # this rank's streams
        state = map_state(lambda s: s[:, rank * rows : (rank + 1) * rows], state)
    module.train_state = state


def _restore_training_sums(checkpoint: dict, world: int, rank: int) -> None:
    """This rank's training sums: its own when the process count is the one saved, else the total
    on rank 0 (the epoch's perplexity is their sum over ranks either way)."""
    by_rank = checkpoint.get("train_ppl_by_rank")
    if by_rank is None:
        return  # one process saved it: the module's own state_dict holds the sums
    if by_rank.size(0) == world:
        sums = by_rank[rank]
    else:
        sums = by_rank.sum(0) if rank == 0 else torch.zeros_like(by_rank[0])
    checkpoint["state_dict"]["train_ppl.nll_sum"], checkpoint["state_dict"]["train_ppl.count"] = sums


def _all_ranks_state(module: L.LightningModule):
    """The carried state of all streams: each rank holds its own rows (called on every rank)."""
    state = module.train_state
    trainer = attached_trainer(module)
    if state is None or trainer is None or trainer.world_size == 1:
        return state
    # all_gather: (ranks, layers, rows, size) -> (layers, ranks * rows, size)
    return map_state(lambda s: module.all_gather(s).transpose(0, 1).flatten(1, 2), state)


def random_state() -> dict:
    """The random generators, which Lightning leaves out of a checkpoint: without them a resumed run
    draws other dropout masks. Tensors and plain values only (NumPy's keys as a tensor)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_initialized():  # this process's GPU; every rank starts from the same seed
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose best scores survive a moved run folder.

    Lightning drops them when the saved `dirpath` differs from today's, and then writes a best
    checkpoint over a better one; the paths are rebased onto the folder the run is in now.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        then, now = state_dict.get("dirpath"), self.dirpath
        if then and now and then != now:

            def moved(path: str) -> str:
                return os.path.join(now, os.path.relpath(path, then)) if path else path

            state_dict = {
                **state_dict,
                "dirpath": now,
                "best_model_path": moved(state_dict["best_model_path"]),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path", "")),
                "last_model_path": moved(state_dict.get("last_model_path", "")),
                "best_k_models": {moved(p): v for p, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)
