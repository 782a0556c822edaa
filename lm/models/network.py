"""The contract every network of lm/models keeps, so that training, evaluation and the tools can use
any of them (docs/design.md, "Model and training").

A network reads token ids x (batch, steps) from a carried state and returns features (batch, steps,
`output_size`), its last layer's outputs at each position, with the new state. Its softmax head turns
features into log-probabilities: of given targets only (training; the adaptive softmax computes no
more than their clusters), or of the whole vocabulary (the cache, generation).

The state is what the network carries from one window to the next:
- a list of tuples of tensors, each with the batch (the streams) in dimension 1, so that a rank's
  rows can be sliced out of it and the ranks' rows gathered into it;
- None means the network's empty state (zeros, for most): the start of every epoch and of every
  evaluation pass;
- it is detached between windows (`map_state(torch.Tensor.detach, state)`: truncated BPTT) and
  moved with `map_state(lambda s: s.to(device), state)`; nothing else is done to it from outside.
"""

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from lm.options import build, defaults, problems, refusal, refuse

State = list[tuple[torch.Tensor, ...]]


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State | None) -> State | None:
    """`fn` applied to every tensor of a state (detach, move, slice); None stays None."""
    return None if state is None else [tuple(fn(tensor) for tensor in layer) for layer in state]


class Network(Protocol):
    """What training (lm/training/module.py), evaluation (lm/evaluation/) and the tools call."""

    output_size: int  # the size of the features: what the softmax and the cache read
    embedding: nn.Embedding  # dynamic evaluation updates only the rows of the words it saw
    decoder: nn.Linear | None  # the full softmax's layer, None with another head (dynamic evaluation)

    def features(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The last layer's outputs (batch, steps, output_size) for ids x, before output dropout."""

    def drop_output(self, features: torch.Tensor) -> torch.Tensor:
        """The features as training's softmax reads them: output dropout (identity in eval mode)."""

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) (batch, steps) at each position: the training loss's terms."""

    def evaluate_targets(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`target_log_probs` and the likeliest token at each position (batch, steps)."""

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The whole distribution (batch, steps, vocab), unnormalised or already log-probabilities."""

    def __call__(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits for ids x and the new state (generation, dynamic evaluation's statistics)."""


class NetworkOptions:
    """The base of each network's options, a dataclass declared in the network's module (as
    `LSTMOptions`): lm/config.py offers every subclass (at any depth) to Hydra as a `model/net`
    choice, named `name`, whose keys are its fields. The LightningModule and the tools build the
    network with `network(vocab_size)`."""

    name: ClassVar[str]  # the choice: python train.py model/net=<name>

    def network(self, vocab_size: int) -> Network:
        raise NotImplementedError

    def problems(self, prefix: str, vocab_size: int | None = None) -> list[str]:
        """What the options refuse together, one line each, each value being already of its field's
        type and within its rule; with `vocab_size`, against the vocabulary too."""
        return []


def network_options() -> dict[str, type[NetworkOptions]]:
    """Every network's options class by its dotted path (what a model.net node's `_target_` names):
    each module of lm/models may declare one, and is a network from then on, with no list to extend."""
    import lm.models  # here: lm.models's modules import this one

    for module in pkgutil.iter_modules(lm.models.__path__):
        importlib.import_module(f"lm.models.{module.name}")
    return {f"{c.__module__}.{c.__qualname__}": c for c in _subclasses(NetworkOptions)}


def _subclasses(cls: type) -> list[type]:
    """Every class derived from `cls`, at any depth (MogrifierOptions extends LSTMOptions)."""
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def network_problems(net: Mapping[str, Any], vocab_size: int | None = None) -> list[str]:
    """The problems of a network's options node (model.net), one line each. Its `_target_` is looked
    up among the networks' options, never imported: a checkpoint someone handed over names it."""
    target = str(net.get("_target_"))
    known = network_options()
    if target not in known:
        return [refusal("model.net._target_", target, f"the options of a network: {', '.join(known)}")]
    options = known[target]
    lines = problems(options, net, "model.net")
    foreign = [key for key in net if not key.startswith("_") and key not in defaults(options)]
    if foreign:  # most often a preset of another network (model=small: the LSTM's) under model/net=...
        keys = ", ".join(f"model.net.{key}" for key in foreign)
        lines.append(
            f"{keys}: not options of model/net={options.name}, probably set by a preset of another network "
            f"(the default model=small sets the LSTM's); take this network with one of its own presets "
            f"instead: a conf/model/ file that says `override /model/net: {options.name}`."
        )
    if not lines:  # each value of its field's type and rule: what they refuse together
        lines = build(options, net).problems("model.net", vocab_size)
    return lines


def build_network(net: Mapping[str, Any], vocab_size: int) -> Network:
    """The network of an options node, or one UserError listing every problem of its options."""
    refuse(network_problems(net, vocab_size))
    return build(network_options()[net["_target_"]], net).network(vocab_size)
