"""The model's options checked before any work: one line naming the key and what is allowed."""

from collections.abc import Sequence
from itertools import pairwise

from lm.errors import UserError, check_rules


def check_options(
    hidden_size,
    num_layers,
    dropout,
    init_scale,
    lr,
    lr_decay,
    decay_after,
    embedding_size,
    input_dropout,
    hidden_dropout,
    output_dropout,
    embedding_dropout,
    weight_drop,
    init,
    ar,
    tar,
    weight_decay,
    loss_average,
    asgd_nonmono,
    tie_weights,
    softmax,
    cutoffs,
    div_value,
    vocab_size=None,
    **_,
) -> None:
    """One clear error, before any work, for a value the model cannot train with; the cutoffs
    against the vocabulary once its size is known (the module's __init__)."""
    rules = [
        (
            "hidden_size",
            hidden_size,
            isinstance(hidden_size, int) and hidden_size >= 1,
            "an integer, 1 or more",
        ),
        ("num_layers", num_layers, isinstance(num_layers, int) and num_layers >= 1, "an integer, 1 or more"),
        ("dropout", dropout, isinstance(dropout, int | float) and 0 <= dropout < 1, "a number in [0, 1)"),
        (
            "init_scale",
            init_scale,
            isinstance(init_scale, int | float) and init_scale > 0,
            "a number above 0",
        ),
        ("lr", lr, isinstance(lr, int | float) and lr >= 0, "a number, 0 or more"),
        ("lr_decay", lr_decay, isinstance(lr_decay, int | float) and lr_decay > 0, "a number above 0"),
        (
            "decay_after",
            decay_after,
            isinstance(decay_after, int) and decay_after >= 0,
            "an integer, 0 or more",
        ),
        (
            "embedding_size",
            embedding_size,
            embedding_size is None or isinstance(embedding_size, int) and embedding_size >= 1,
            "null (hidden_size) or an integer, 1 or more",
        ),
        *(
            (key, value, isinstance(value, int | float) and 0 <= value < 1, "a number in [0, 1)")
            for key, value in [
                ("input_dropout", input_dropout),
                ("hidden_dropout", hidden_dropout),
                ("output_dropout", output_dropout),
                ("embedding_dropout", embedding_dropout),
                ("weight_drop", weight_drop),
            ]
        ),
        ("init", init, init in ("uniform", "awd"), "uniform or awd"),
        *(
            (key, value, isinstance(value, int | float) and value >= 0, "a number, 0 or more")
            for key, value in [("ar", ar), ("tar", tar), ("weight_decay", weight_decay)]
        ),
        ("loss_average", loss_average, loss_average in ("streams", "tokens"), "streams or tokens"),
        (
            "asgd_nonmono",
            asgd_nonmono,
            asgd_nonmono is None or isinstance(asgd_nonmono, int) and asgd_nonmono >= 1,
            "null (plain SGD) or an integer, 1 or more",
        ),
        ("softmax", softmax, softmax in ("full", "adaptive"), "full or adaptive"),
        ("div_value", div_value, isinstance(div_value, int | float) and div_value > 0, "a number above 0"),
    ]
    if softmax == "adaptive":
        limit = "" if vocab_size is None else f" and below the vocabulary size ({vocab_size})"
        allowed = f"a strictly increasing list of integers, each 1 or more{limit}, such as [2000,5000]"
        rules.append(("cutoffs", cutoffs, _cutoffs_valid(cutoffs, vocab_size), allowed))
    else:
        allowed = "null with model.softmax=full; set model.softmax=adaptive to use them"
        rules.append(("cutoffs", cutoffs, cutoffs is None, allowed))
    check_rules("model", rules)
    if softmax == "adaptive" and hidden_size // div_value ** len(cutoffs) < 1:
        raise UserError(
            f"model.div_value={div_value} leaves the last of {len(cutoffs)} tail clusters no projection "
            f"(model.hidden_size {hidden_size} // {div_value} ** {len(cutoffs)} = 0 units): lower "
            "model.div_value or give fewer model.cutoffs."
        )
    if softmax == "adaptive" and tie_weights:
        raise UserError(
            "model.tie_weights=true is not allowed with model.softmax=adaptive: its projections cannot "
            "share the embedding matrix; set model.tie_weights=false or model.softmax=full."
        )


def _cutoffs_valid(cutoffs, vocab_size: int | None) -> bool:
    """A list (or Hydra's ListConfig) of integers 1 <= c_1 < c_2 < ... < vocab_size."""
    if not isinstance(cutoffs, Sequence) or isinstance(cutoffs, str) or len(cutoffs) == 0:
        return False
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs):
        return False
    increasing = cutoffs[0] >= 1 and all(a < b for a, b in pairwise(cutoffs))
    return increasing and (vocab_size is None or cutoffs[-1] < vocab_size)
