"""Each target's probability in a text file, one per line: the format of the per-model files of
Herel & Mikolov's "Ensemble of All" (github.com/DavidHerel/sota_lm), which `python -m
lm.tools.ensemble` mixes.

Line i holds the probability of token i + 1 of the text: the first token is read, not scored, and
every `<eos>` is a target. A split of N tokens gives N - 1 lines, evaluate.py's `targets`: PTB's
valid 73,759 and test 82,429, the lengths of their files. The probabilities are plain, not logs,
each the shortest decimal that reads back as the same float64, so that the perplexity recomputed
from a file is the one evaluate.py printed.
"""

from pathlib import Path

import torch

from lm.errors import UserError

# A mixture with the cache, added in float64, may exceed 1 by a rounding; more than that is another
# format (log-probabilities, losses).
ROUNDING = 1e-9


def probability_lines(log_probs: torch.Tensor) -> str:
    """The file's text for the targets' natural-log probabilities."""
    return "".join(f"{probability!r}\n" for probability in log_probs.double().exp().tolist())


def read_probabilities(path: Path) -> torch.Tensor:
    """A file's probabilities in float64, refused in one line naming it where it cannot be read or
    a line is not a number in (0, 1]."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise UserError(f"{path} cannot be read ({reason}).") from None
    probabilities = []
    for number, line in enumerate(lines, 1):
        try:
            probability = float(line)
        except ValueError:
            probability = float("nan")
        if not 0 < probability <= 1 + ROUNDING:  # NaN too
            raise UserError(
                f"{path}, line {number}: {line.strip()!r} is not a probability in (0, 1]; a file of "
                "per-token probabilities holds one per target (evaluate.py probs_file=...)."
            )
        probabilities.append(probability)
    if not probabilities:
        raise UserError(f"{path} holds no probability: it is empty.")
    return torch.tensor(probabilities, dtype=torch.float64)
