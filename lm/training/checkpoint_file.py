"""Reading a checkpoint file safely: its checksums first, then torch.load(weights_only=True), and
its options in today's layout. Without Lightning, so that score.py, generate.py and the Python API
read a checkpoint without importing it (what a checkpoint holds: lm/training/checkpoint.py)."""

import dataclasses
import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch

from lm.errors import UserError
from lm.models.lstm import LSTMOptions

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
