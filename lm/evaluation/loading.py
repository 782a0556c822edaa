"""A trained model back from its checkpoint, with its vocabulary, or one clear error."""

import pickle
from pathlib import Path

import torch

from lm.errors import UserError
from lm.training.checkpoint import unsafe_checkpoint
from lm.training.module import LanguageModel


def load_model(ckpt_path: str, device: torch.device | str = "cpu") -> LanguageModel:
    """The model of a `train.py` checkpoint, in evaluation mode on `device`."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={path} is not a file; give a .ckpt from a run's checkpoints/ folder.")
    try:
        # Not compiled: a run pays compilation back over epochs, one pass over a text does not.
        model = LanguageModel.load_from_checkpoint(path, map_location="cpu", weights_only=True, compile=False)
    except pickle.UnpicklingError as error:  # more than tensors and plain values: it could run code
        raise unsafe_checkpoint(path, "ckpt_path", error) from None
    except Exception as error:  # truncated, corrupt, or not a checkpoint of this project
        raise UserError(
            f"ckpt_path={path} cannot be read as a checkpoint of this project ({type(error).__name__}: "
            f"{error}). It may be truncated or damaged; use another one, such as the run's last.ckpt."
        ) from error
    if model.vocabulary is None:
        raise UserError(f"ckpt_path={path} holds no vocabulary: it was saved before checkpoints carried one.")
    return model.to(device).eval()


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one; else the named device (cpu, cuda, cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N.") from error
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"device={name} asks for a GPU PyTorch does not see ({torch.cuda.device_count()}); use cpu."
        )
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name}: only cpu and cuda devices are supported.")
    return device
