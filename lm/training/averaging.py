"""Non-monotonically triggered ASGD (Merity et al. 2017): once validation stops improving, the
weights are averaged after every step from then on (docs/training.md, "AWD-LSTM options").

The steps stay SGD's; the average is a frozen copy of the network (torch's `AveragedModel`), which
no optimiser or DDP sees. Validation and the test use it, and every checkpoint holds it as the model
("state_dict", what evaluate.py and `load_from_checkpoint` read) beside the raw weights training goes
on from ("training_state_dict").

A unit the LightningModule owns rather than a callback: the raw weights must be handed back in
the checkpoint before Lightning loads the model's state, and Lightning restores callbacks after
the model. Lightning's `WeightAveraging` callback swaps the averaged weights into the model during
validation, which a checkpoint taken then would save as the raw ones.
"""

import logging

from torch import nn
from torch.optim.swa_utils import AveragedModel

log = logging.getLogger(__name__)


class WeightAveraging(nn.Module):
    """`nonmono` None: plain SGD, nothing is ever averaged. A module, so that the average's weights
    and count are in the LightningModule's state (a resumed run goes on averaging)."""

    def __init__(self, nonmono: int | None):
        super().__init__()
        self.nonmono = nonmono
        self.val_losses: list[float] = []  # each epoch's validation loss (log perplexity)
        self.since: int | None = None  # the epoch from which the weights are averaged
        self.average: AveragedModel | None = None

    @property
    def enabled(self) -> bool:
        return self.nonmono is not None

    def after_validation(self, loss: float, epoch: int, net: nn.Module) -> None:
        """Switch to averaging when `loss` is no better than the best before the last `nonmono` epochs."""
        n = self.nonmono
        if self.since is None and len(self.val_losses) > n and loss > min(self.val_losses[:-n]):
            self.since = epoch
            self.average = average_of(net)
            log.info("epoch %d: validation stopped improving; averaging the weights (ASGD)", epoch + 1)
        self.val_losses.append(loss)

    def after_step(self, net: nn.Module) -> None:
        if self.average is not None:
            self.average.update_parameters(net)

    def evaluated(self, net: nn.Module) -> nn.Module:
        """The network validation and the test score: the average once there is one."""
        return self.average.module if self.average is not None else net

    def history(self) -> dict:
        return {"val_losses": self.val_losses, "averaging_since": self.since}

    def save(self, checkpoint: dict) -> None:
        """The average as the checkpoint's model, the raw weights beside it to train on from."""
        checkpoint["asgd"] = self.history()
        if self.average is not None:
            checkpoint["training_state_dict"] = checkpoint["state_dict"]
            checkpoint["state_dict"] = {f"net.{k}": v for k, v in self.average.module.state_dict().items()}

    def load(self, checkpoint: dict, net: nn.Module, fitting: bool) -> None:
        """Resuming (`fitting`): the raw weights become the model's and the average goes on (its
        weights and count are in the module's state); otherwise the average already is the model."""
        for weights in (checkpoint["state_dict"], checkpoint.get("training_state_dict", {})):
            for key in [
                key for key in weights if key.startswith("averaged.")
            ]:  # as 3217f87 and earlier named them
                weights[key.replace("averaged.", "averaging.average.", 1)] = weights.pop(key)
        asgd = checkpoint.get("asgd", {})
        self.val_losses = list(asgd.get("val_losses", []))
        self.since = asgd.get("averaging_since")
        self.average = None
        if fitting and "training_state_dict" in checkpoint:
            checkpoint["state_dict"] = checkpoint["training_state_dict"]
            self.average = average_of(net)


def average_of(net: nn.Module) -> AveragedModel:
    """A running mean of `net`'s weights, updated after every step; frozen, so that no optimiser or
    DDP takes it for weights to train."""
    return AveragedModel(net).requires_grad_(False)
