"""Several language models mixed linearly, p(w) = sum_i weight_i p_i(w), from each one's probability
of every target (evaluate.py's probs_file=, or a file of Herel & Mikolov's "Ensemble of All"): the
weights are fitted on valid by EM, then valid and test are scored with them.

python -m lm.tools.ensemble --valid a.valid.txt b.valid.txt --test a.test.txt b.test.txt
python -m lm.tools.ensemble --valid a.valid.txt b.valid.txt --test a.test.txt b.test.txt --json ensemble.json

Model i is the i-th file of --valid and the i-th of --test. Prints each model's weight and valid
and test perplexity, and the ensemble's; all in float64.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.errors import UserError, exit_on_user_error
from lm.evaluation.outputs import output_file, write_whole
from lm.evaluation.scoring import perplexity
from lm.evaluation.token_probs import read_probabilities
from lm.json_output import json_text
from lm.options import refusal

# EM gains ever less near the optimum (502 steps to 1e-9 on Herel & Mikolov's seven PTB models);
# where it still gains `tolerance` per step this many steps on, the weights are given as they are,
# with a warning.
MAX_ITERATIONS = 10_000


@dataclass(frozen=True)
class Fit:
    """EM's weights, its steps, and whether it stopped by the tolerance (not by MAX_ITERATIONS)."""

    weights: torch.Tensor
    iterations: int
    converged: bool


def fit_weights(probs: torch.Tensor, tolerance: float) -> Fit:
    """The mixture weights that maximise the likelihood of `probs` (models x targets), by EM.

    From uniform weights, each step gives every model the mean, over the targets, of its share of
    the mixed probability (its responsibility). A step never lowers the likelihood, which is concave
    in the weights, so EM ends at the best mixture; it stops when the mean log-likelihood per target
    improves by less than `tolerance` nats.
    """
    weights = torch.full((len(probs),), 1 / len(probs), dtype=torch.float64)
    mixed = weights @ probs
    likelihood = mixed.log().mean().item()
    for iteration in range(1, MAX_ITERATIONS + 1):
        weights = weights * (probs @ (1 / mixed)) / probs.shape[1]  # mean of weight * p / mixed
        weights /= weights.sum()  # 1 already, but for the rounding
        mixed = weights @ probs
        previous, likelihood = likelihood, mixed.log().mean().item()
        if likelihood - previous < tolerance:
            return Fit(weights, iteration, True)
    return Fit(weights, MAX_ITERATIONS, False)


def split_perplexity(probs: torch.Tensor) -> float:
    """exp of the mean negative log-probability: evaluate.py's perplexity of the same targets."""
    return perplexity(-probs.log().sum().item(), len(probs))


def read_split(files: list[Path], option: str) -> torch.Tensor:
    """The files' probabilities, models x targets; refused in one line unless all score as many targets."""
    probs = [read_probabilities(file) for file in files]
    if len({len(p) for p in probs}) > 1:
        counts = ", ".join(f"{file} {len(p)}" for file, p in zip(files, probs, strict=True))
        raise UserError(
            f"The {option} files hold different numbers of probabilities ({counts}): each must hold one "
            "per target of the same text."
        )
    return torch.stack(probs)


def ensemble(valid_files: list[Path], test_files: list[Path], tolerance: float) -> dict:
    """The weights fitted on the valid files, and every model's and the ensemble's perplexities."""
    if len(valid_files) != len(test_files):
        raise UserError(
            f"--valid names {len(valid_files)} files and --test {len(test_files)}: give one of each per "
            "model, in the same order."
        )
    if not tolerance > 0:  # NaN too
        raise UserError(refusal("--tolerance", tolerance, "a number above 0"))
    valid, test = read_split(valid_files, "--valid"), read_split(test_files, "--test")
    fit = fit_weights(valid, tolerance)
    models = [
        {
            "valid_file": str(valid_file),
            "test_file": str(test_file),
            "weight": weight,
            "valid_ppl": split_perplexity(valid_probs),
            "test_ppl": split_perplexity(test_probs),
        }
        for valid_file, test_file, weight, valid_probs, test_probs in zip(
            valid_files, test_files, fit.weights.tolist(), valid, test, strict=True
        )
    ]
    return {
        "models": models,
        "ensemble": {
            "valid_ppl": split_perplexity(fit.weights @ valid),
            "test_ppl": split_perplexity(fit.weights @ test),
        },
        "valid_targets": valid.shape[1],
        "test_targets": test.shape[1],
        "em": {"iterations": fit.iterations, "converged": fit.converged, "tolerance": tolerance},
    }


def text_table(result: dict) -> str:
    """Perplexities to two decimals, weights to four, as lm.tools.report prints."""
    rows = [["model", "weight", "valid_ppl", "test_ppl"]]
    for model in result["models"]:
        rows.append(
            [
                model["valid_file"],
                f"{model['weight']:.4f}",
                f"{model['valid_ppl']:.2f}",
                f"{model['test_ppl']:.2f}",
            ]
        )
    mixed = result["ensemble"]
    rows.append(["ensemble", "-", f"{mixed['valid_ppl']:.2f}", f"{mixed['test_ppl']:.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


@exit_on_user_error
def main(arguments: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--valid", type=Path, nargs="+", required=True, help="each model's file on valid")
    parser.add_argument("--test", type=Path, nargs="+", required=True, help="each model's file on test")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-9,
        help="EM stops when the valid log-likelihood gains less than this, in nats per target (1e-9)",
    )
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    args = parser.parse_args(arguments)

    out = None
    if args.json:  # checked before the files are read
        out = output_file(str(args.json), "--json", dict.fromkeys(args.valid + args.test, "a file read"))
    result = ensemble(args.valid, args.test, args.tolerance)
    print(text_table(result))
    em = result["em"]
    if em["converged"]:
        print(f"Weights fitted on valid by EM in {em['iterations']} steps.")
    else:
        print(
            f"EM still gained {args.tolerance:g} nats per target after {em['iterations']} steps: the "
            "weights as they are."
        )
    if out:
        write_whole(out, "--json", json_text(result))
    return result


if __name__ == "__main__":
    main()
