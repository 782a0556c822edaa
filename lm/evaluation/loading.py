"""A trained model back from its checkpoint: its network and vocabulary, or one clear error. The one
module of lm/evaluation that reads a checkpoint (what one holds is lm/training/checkpoint.py's)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.data.vocabulary import Vocabulary
from lm.errors import UserError
from lm.models.network import Network, build_network
from lm.training.checkpoint import network_node, read_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """What using a model needs: the network (the average, for an NT-ASGD run) and its vocabulary."""

    net: Network
    vocabulary: Vocabulary


def load_model(ckpt_path: str, device: torch.device | str = "cpu") -> TrainedModel:
    """The model of a `train.py` checkpoint, in evaluation mode on `device`."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={path} is not a file; give a .ckpt from a run's checkpoints/ folder.")
    try:
        checkpoint = read_checkpoint(path, "ckpt_path")  # refuses, in one line, a damaged or unsafe file
        net = build_network(network_node(checkpoint), checkpoint["hyper_parameters"]["vocab_size"])
        state = checkpoint["state_dict"]  # the network's weights are "net.*" (NT-ASGD: the average)
        weights = {key: value for key, value in state.items() if key.startswith("net.")}
        _refuse_non_finite(weights, path)
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
    return TrainedModel(net.to(device).eval(), vocabulary)


def _refuse_non_finite(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that hold a NaN or an infinity: every sample and score would be NaN, or
    torch.multinomial would stop with a traceback. train.py saves none (docs/troubleshooting.md,
    Divergence), so such a file was saved by something else, or altered."""
    bad = [key for key, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        others = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(
            f"ckpt_path={path} holds weights that are not finite (NaN or inf in {bad[0]}{others}): use "
            "a checkpoint saved before they went bad, such as the run's best_checkpoint in metrics.json."
        )


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
