"""A trained model back from a checkpoint or a model folder: its network and vocabulary, or one
clear error. The one module of lm/evaluation that reads a checkpoint (what one holds is
lm/training/checkpoint.py's; reading one, Lightning-free, lm/training/checkpoint_file.py's); a model
folder is lm/evaluation/model_folder.py's."""

import logging
from pathlib import Path

import torch

from lm.data.vocabulary import Vocabulary
from lm.errors import UserError
from lm.evaluation.model_folder import TrainedModel, read_model_folder, refuse_non_finite
from lm.models.network import build_network
from lm.training.checkpoint_file import network_node, read_checkpoint

log = logging.getLogger(__name__)


def load_model(ckpt_path: str | Path, device: torch.device | str = "cpu") -> TrainedModel:
    """The model of a `train.py` checkpoint or of a model folder, in evaluation mode on `device`."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        return read_model_folder(path).to(device)
    if not path.is_file():
        raise UserError(
            f"ckpt_path={path} is neither a file nor a folder; give a .ckpt from a run's checkpoints/ "
            "folder, or a model folder that python -m lm.tools.export wrote."
        )
    return read_checkpoint_model(path).to(device)


def read_checkpoint_model(path: Path) -> TrainedModel:
    # read_checkpoint refuses, in one line, a damaged or unsafe file.
    return model_of_checkpoint(read_checkpoint(path, "ckpt_path"), path)


def model_of_checkpoint(checkpoint: dict, path: Path) -> TrainedModel:
    """The model in a checkpoint's contents (`read_checkpoint`'s), which `path` held."""
    try:
        net = build_network(network_node(checkpoint), checkpoint["hyper_parameters"]["vocab_size"])
        state = checkpoint["state_dict"]  # the network's weights are "net.*" (NT-ASGD: the average)
        weights = {key: value for key, value in state.items() if key.startswith("net.")}
        refuse_non_finite(
            weights,
            f"ckpt_path={path}",
            "use a checkpoint saved before they went bad, such as the run's best_checkpoint in metrics.json",
        )
        net.load_state_dict({key.removeprefix("net."): value for key, value in weights.items()})
        if "vocabulary" not in checkpoint:
            raise UserError(
                f"ckpt_path={path} holds no vocabulary: it was trained without a corpus that has one, "
                "not by train.py; use a checkpoint of a train.py run."
            )
        vocabulary = Vocabulary.from_state_dict(checkpoint["vocabulary"])
    except UserError:
        raise
    except Exception as error:  # whole, but not a checkpoint of this project (torch's detail: the log)
        log.debug("%s is no checkpoint of this project", path, exc_info=error)
        raise UserError(
            f"ckpt_path={path} cannot be read as a checkpoint of this project ({type(error).__name__}); "
            "give a .ckpt that train.py wrote, from a run's checkpoints/ folder."
        ) from None
    return TrainedModel(net.eval(), vocabulary)


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
