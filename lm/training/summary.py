"""The model summary at the start of training, with the network's training FLOPs per token.

Lightning's summary has a FLOPs column and a "Total FLOPs" line, which read 0 for every model of
this project: Lightning counts FLOPs only while running the module's `example_input_array` under
torch's FLOP counter, and this module has none (its input is a window and a carried state); the
counter has no formula for the LSTM op either. This summary keeps Lightning's other figures and
replaces those by the project's own count, from the network's layers, stated per training token.
"""

import logging
import math

import lightning as L
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from lightning.pytorch.utilities.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
    summarize,
)
from torch import nn

log = logging.getLogger(__name__)


def flops_per_token(net: nn.Module) -> float:
    """Matrix-multiply FLOPs of one training token through `net` (an LSTM network of lm/models): the
    forward pass, and twice that backward; 2 FLOPs per multiply-add.

    Counted from the built layers, so an `embedding_size` and tied weights count as they are: each
    weight matrix of the recurrent layers multiplies once per token (an LSTM layer's [x, h] into
    4 x hidden gates; a Mogrifier layer's Q and R too), and the full softmax's decoder its input
    features into the vocabulary. NaN with the adaptive softmax (no decoder): its cost per token
    depends on the targets; NaN too for a network without such layers (the xLSTM's blocks).
    """
    if net.decoder is None or not hasattr(net, "rnns"):
        return math.nan
    matrices = [parameter for parameter in net.rnns.parameters() if parameter.dim() == 2]
    forward = 2 * (net.decoder.weight.numel() + sum(matrix.numel() for matrix in matrices))
    return 3 * forward


class ModelSummary(LightningModelSummary):
    """Lightning's summary table (layers, parameters, size, modes) with `flops_per_token` of the
    module's network in place of Lightning's FLOPs. Being a ModelSummary, it stands in for the one
    Lightning would add (lm/training/trainer.py's build_trainer drops it for
    `trainer.enable_model_summary=false`)."""

    def __init__(self, max_depth: int = 1):
        super().__init__(max_depth=max_depth)
        self.max_depth = max_depth

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.max_depth and trainer.is_global_zero:
            summary = summarize(pl_module, max_depth=self.max_depth)
            log.info("model summary\n%s", summary_table(summary, flops_per_token(pl_module.net)))


def summary_table(summary: Summary, flops: float) -> str:
    """Lightning's summary (`lightning.pytorch.utilities.model_summary.summarize`) as its plain-text
    table, then the totals, the last of them the training FLOPs per token."""
    columns = {
        " ": [str(index) for index in range(len(summary.layer_names))],
        "Name": summary.layer_names,
        "Type": summary.layer_types,
        "Params": [get_human_readable_count(count).strip() for count in summary.param_nums],
        "Mode": ["train" if training else "eval" for training in summary.training_modes],
    }
    widths = [max(len(cell) for cell in [header, *cells]) for header, cells in columns.items()]
    rows = [list(columns), *zip(*columns.values(), strict=True)]
    lines = [
        " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    rule = "-" * max(len(line) for line in lines)
    trainable = summary.trainable_parameters
    flops_note = "matrix multiplies, forward and backward"
    if math.isnan(flops):
        flops_figure, flops_note = "n/a", "counted for the LSTM and Mogrifier with the full softmax"
    else:
        flops_figure = get_human_readable_count(int(flops))
    totals = [
        (get_human_readable_count(trainable), "Trainable params"),
        (get_human_readable_count(summary.total_parameters - trainable), "Non-trainable params"),
        (get_human_readable_count(summary.total_parameters), "Total params"),
        (get_formatted_model_size(summary.model_size), "Total estimated model params size (MB)"),
        (summary.total_training_modes["train"], "Modules in train mode"),
        (summary.total_training_modes["eval"], "Modules in eval mode"),
        (flops_figure, f"Training FLOPs per token ({flops_note})"),
    ]
    return "\n".join(
        [lines[0], rule, *lines[1:], rule, *(f"{str(value).strip():<10}{label}" for value, label in totals)]
    )
