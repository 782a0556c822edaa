"""A trained model as a folder of plain files, safe to open and loaded without Lightning or Hydra
(docs/export.md). python -m lm.tools.export writes one; every tool that takes a checkpoint takes one.

    config.json        the network's options (a train.py run's model.net), the vocabulary's size and
                       tokenisation, and where the model came from
    model.safetensors  the network's weights and nothing else: no pickle, so nothing in it can run
    vocab.txt          the tokens, one per line, in id order
    README.md          the model card (what the export tool knew: the run, its perplexities)

The layout is Hugging Face's save_pretrained / from_pretrained convention. Its PyTorchModelHubMixin
is not used: it rebuilds a model by passing config.json's values to the class as arguments, where a
folder someone handed over must have its options checked first and its network looked up among this
package's, never imported by name; and what the mixin adds beyond that is the hub, which needs a
network connection.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lm.data.text import UNK, Tokenizer
from lm.data.vocabulary import Vocabulary
from lm.errors import UserError
from lm.models.network import Network, build_network

CONFIG, WEIGHTS, VOCABULARY, CARD = FILES = ("config.json", "model.safetensors", "vocab.txt", "README.md")
FORMAT = "lstm-lm model folder"
FORMAT_VERSION = 1


@dataclass
class TrainedModel:
    """What using a model needs: the network (the average, for an NT-ASGD run) and its vocabulary."""

    net: Network
    vocabulary: Vocabulary

    def to(self, device: torch.device | str) -> "TrainedModel":
        self.net.to(device)
        return self


def refuse_non_finite(weights: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Refuse weights that hold a NaN or an infinity: every sample and score would be NaN, or
    torch.multinomial would stop with a traceback. train.py saves none (docs/troubleshooting.md,
    Divergence), so such a file was saved by something else, or altered."""
    bad = [key for key, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        others = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"{what} holds weights that are not finite (NaN or inf in {bad[0]}{others}): {fix}.")


def _safetensors() -> Any:
    """safetensors.torch, or one line naming the extra that installs it."""
    try:
        import safetensors.torch
    except ImportError:
        raise UserError('model folders need the safetensors package: pip install -e ".[export]"') from None
    return safetensors.torch


def write_model_folder(folder: Path, net_options: dict, model: TrainedModel, card: str, origin: dict) -> None:
    """The four files into `folder`, which must exist; `net_options` is the model.net node that built
    `model.net`, `origin` what config.json records of where the model came from."""
    vocabulary = model.vocabulary
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "network": net_options,
        "vocab_size": len(vocabulary),
        "tokenizer": {"level": vocabulary.tokenizer.level, "lowercase": vocabulary.tokenizer.lowercase},
        "origin": origin,
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # save_model, not save_file: the tied decoder shares the embedding's storage, which save_file
    # refuses; save_model keeps one name of the two, and load_model ties them again.
    _safetensors().save_model(model.net, str(folder / WEIGHTS), metadata={"format": "pt"})
    # safetensors writes its file for its owner alone (0600): readable as the folder's other files are,
    # so that a folder shared with others loads for them too.
    (folder / WEIGHTS).chmod((folder / CONFIG).stat().st_mode & 0o777)
    (folder / VOCABULARY).write_text("".join(f"{token}\n" for token in vocabulary.tokens), encoding="utf-8")
    (folder / CARD).write_text(card, encoding="utf-8")


def read_model_folder(folder: Path) -> TrainedModel:
    """The model of a folder `write_model_folder` wrote, or one UserError naming the file at fault."""
    config = _read_config(folder / CONFIG)
    vocabulary = _read_vocabulary(folder / VOCABULARY, config)
    try:
        net = build_network(config["network"], config["vocab_size"])
    except UserError as error:
        raise UserError(f"{folder / CONFIG}: its network options are refused: {error}") from None
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights} is missing: a model folder holds {CONFIG}, {WEIGHTS} and {VOCABULARY}.")
    safetensors = _safetensors()
    try:
        missing, unexpected = safetensors.load_model(net, str(weights), strict=False, device="cpu")
    except Exception as error:  # SafetensorError (damaged), RuntimeError (another shape): torch's words
        detail = " ".join(str(error).split())[:300]
        raise UserError(
            f"{weights} does not hold the weights of the network {CONFIG} describes ({detail}); "
            "export the model again."
        ) from None
    if missing or unexpected:
        names = ", ".join([*missing, *unexpected][:3])
        raise UserError(
            f"{weights} does not hold the weights of the network {CONFIG} describes "
            f"({len(missing)} missing, {len(unexpected)} not the network's: {names}); export the model again."
        )
    refuse_non_finite(net.state_dict(), str(weights), "export the model again from a good checkpoint")
    return TrainedModel(net.eval(), vocabulary)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise UserError(
            f"{path} is missing: ckpt_path names a folder, so it must be a model folder that "
            "python -m lm.tools.export wrote, or give a .ckpt file."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not JSON ({error}); export the model again.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(
            f'{path} is not the config of a model folder of this project (no "format": "{FORMAT}").'
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {config.get('format_version')!r}; this version of the project reads "
            f"{FORMAT_VERSION}: export the model again with it."
        )
    size = config.get("vocab_size")
    if not isinstance(config.get("network"), dict) or not isinstance(size, int) or isinstance(size, bool):
        raise UserError(f'{path} must give "network" (the options, an object) and "vocab_size" (an integer).')
    tokenizer = config.get("tokenizer")
    if (
        not isinstance(tokenizer, dict)
        or tokenizer.get("level") not in ("word", "char")
        or not isinstance(tokenizer.get("lowercase"), bool)
    ):
        raise UserError(f'{path}: "tokenizer" must give level (word or char) and lowercase (true or false).')
    return config


def _read_vocabulary(path: Path, config: dict) -> Vocabulary:
    if not path.is_file():
        raise UserError(f"{path} is missing: a model folder holds {CONFIG}, {WEIGHTS} and {VOCABULARY}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error}); export the model again.") from None
    tokens = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    size = config["vocab_size"]
    if len(tokens) != size:
        raise UserError(
            f"{path} holds {len(tokens)} tokens, but {path.parent / CONFIG} says vocab_size {size}."
        )
    if len(set(tokens)) != len(tokens) or UNK not in tokens:
        raise UserError(f"{path} must hold distinct tokens, {UNK} among them, one per line.")
    tokenizer = config["tokenizer"]
    return Vocabulary(tokens, Tokenizer(tokenizer["level"], tokenizer["lowercase"]))
