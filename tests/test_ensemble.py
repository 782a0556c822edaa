"""Per-token probabilities (evaluate.py probs_file=) and their ensemble (python -m lm.tools.ensemble):
the file is the printed perplexity, target by target; EM finds the best linear mixture on valid."""

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.errors import UserError
from lm.evaluation.token_probs import probability_lines, read_probabilities
from lm.tools.ensemble import ensemble, fit_weights, main
from tests.test_adaptation import run_evaluate

TOLERANCE = 1e-9  # the tool's default


def mixture_sample(weights: list[float], targets: int, seed: int, vocabulary: int = 10) -> torch.Tensor:
    """Each model's probability (models x targets) of tokens drawn from the mixture, with these
    `weights`, of the models' distributions: random ones, other at every position."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(weights), targets, vocabulary)
    distributions = -torch.rand(shape, generator=generator, dtype=torch.float64).log()  # Dirichlet(1)
    distributions /= distributions.sum(dim=-1, keepdim=True)
    mixture = torch.einsum("m,mtv->tv", torch.tensor(weights, dtype=torch.float64), distributions)
    tokens = torch.multinomial(mixture, 1, generator=generator)
    return distributions.gather(2, tokens.expand(len(weights), -1, -1))[..., 0]


def perplexity_of(probs: torch.Tensor) -> float:
    return math.exp(-probs.log().mean().item())


def write_probs(path: Path, probs: torch.Tensor) -> Path:
    path.write_text(probability_lines(probs.log()))
    return path


def test_the_weights_are_non_negative_and_sum_to_one():
    for seed in range(3):
        probs = mixture_sample([0.6, 0.3, 0.1, 0.0], 2000, seed)
        probs[3] = probs[0] / 4  # a model worse than another everywhere: its weight goes to 0
        weights = fit_weights(probs, TOLERANCE).weights
        assert weights.dtype == torch.float64 and (weights >= 0).all()
        assert weights.sum().item() == pytest.approx(1, abs=1e-12)
        assert weights[3] < 1e-6


def test_a_model_mixed_with_itself_is_that_model(tmp_path):
    valid, test = mixture_sample([1.0], 3000, seed=1)[0], mixture_sample([1.0], 2000, seed=2)[0]
    files = [write_probs(tmp_path / "valid.txt", valid), write_probs(tmp_path / "test.txt", test)]
    result = ensemble([files[0], files[0]], [files[1], files[1]], TOLERANCE)
    assert [model["weight"] for model in result["models"]] == pytest.approx([0.5, 0.5], abs=1e-12)
    for split, probs in (("valid", valid), ("test", test)):
        assert result["ensemble"][f"{split}_ppl"] == pytest.approx(perplexity_of(probs), rel=1e-9)
        assert result["models"][0][f"{split}_ppl"] == pytest.approx(perplexity_of(probs), rel=1e-9)


def test_em_recovers_the_weights_of_a_known_mixture_and_beats_every_single_model():
    weights = [0.2, 0.5, 0.3]
    probs = mixture_sample(weights, 20_000, seed=3)
    fit = fit_weights(probs, TOLERANCE)
    assert fit.converged
    torch.testing.assert_close(fit.weights, torch.tensor(weights, dtype=torch.float64), rtol=0, atol=0.02)
    mixed = perplexity_of(fit.weights @ probs)
    assert mixed < min(perplexity_of(p) for p in probs)
    assert mixed <= perplexity_of(
        torch.tensor(weights, dtype=torch.float64) @ probs
    )  # the best, not the truth

    # Where one model is best alone, the ensemble reaches it, short of it by EM's tolerance only.
    better, worse = probs[0], probs[0] / 3
    fit = fit_weights(torch.stack([worse, better]), TOLERANCE)
    assert perplexity_of(fit.weights @ torch.stack([worse, better])) <= perplexity_of(better) * (1 + 1e-8)


def test_evaluate_writes_one_probability_per_target_whose_perplexity_is_the_printed_one(
    checkpoint, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="evaluate")
    split_lines = (checkpoint["root"] / "tiny" / "ptb.test.txt").read_text().splitlines()
    targets = sum(len(line.split()) + 1 for line in split_lines) - 1  # every token and <eos> but the first
    cache = ["cache.window=50", "cache.lambda=0.1", "cache.theta=1"]
    dynamic = ["dynamic_eval.method=sgd", "dynamic_eval.lr=1"]
    passes = {"plain": [], "dynamic_eval": dynamic, "cache": cache, "both": dynamic + cache}
    results = {}
    for name, overrides in passes.items():
        probs_file = tmp_path / f"{name}.txt"
        caplog.clear()
        results[name] = run_evaluate(checkpoint, tmp_path / name, f"probs_file={probs_file}", *overrides)
        lines = probs_file.read_text().splitlines()
        assert len(lines) == results[name]["targets"] == targets
        from_file = math.exp(-math.fsum(math.log(float(line)) for line in lines) / len(lines))
        printed = re.search(r"perplexity (\S+) over", caplog.text).group(1)
        assert f"{from_file:.4f}" == printed and from_file == pytest.approx(results[name]["ppl"], rel=1e-12)
        assert results[name]["probs_file"] == str(probs_file)
    assert len({result["ppl"] for result in results.values()}) == 4

    files = [tmp_path / "plain.txt", tmp_path / "both.txt"]  # the test split as valid too: only mechanics
    main(["--valid", *map(str, files), "--test", *map(str, files), "--json", str(tmp_path / "ensemble.json")])
    written = json.loads((tmp_path / "ensemble.json").read_text())
    assert [model["test_ppl"] for model in written["models"]] == pytest.approx(
        [results["plain"]["ppl"], results["both"]["ppl"]], rel=1e-12
    )
    assert written["ensemble"]["valid_ppl"] <= min(results["plain"]["ppl"], results["both"]["ppl"])


def test_probs_file_never_replaces_the_checkpoint(checkpoint, tmp_path):
    before = checkpoint["ckpt"].read_bytes()
    with pytest.raises(UserError, match=r"probs_file=.* is the checkpoint, which writing would replace"):
        run_evaluate(checkpoint, tmp_path / "run", f"probs_file={checkpoint['ckpt']}")
    assert checkpoint["ckpt"].read_bytes() == before


def test_files_of_other_lengths_are_refused_in_one_line(tmp_path):
    probs = mixture_sample([0.5, 0.5], 100, seed=4)
    a, b = write_probs(tmp_path / "a.txt", probs[0]), write_probs(tmp_path / "b.txt", probs[1, :99])
    result = subprocess.run(
        [sys.executable, "-m", "lm.tools.ensemble", "--valid", str(a), str(b), "--test", str(a), str(a)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"The --valid files hold different numbers of probabilities ({a} 100, {b} 99): each must hold "
        "one per target of the same text."
    ]

    with pytest.raises(UserError, match=r"^--valid names 2 files and --test 1: give one of each per model"):
        ensemble([a, b], [a], TOLERANCE)
    (tmp_path / "log.txt").write_text(probability_lines(probs[0].log()).replace("0.", "-0.", 1))
    with pytest.raises(UserError, match=r"log.txt, line 1: '-0\.\d+' is not a probability in \(0, 1\]"):
        read_probabilities(tmp_path / "log.txt")
