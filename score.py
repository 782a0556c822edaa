"""The log-probability and perplexity of every line of a file under a trained model.

    python score.py ckpt_path=PATH file=sentences.txt                     # each line from a fresh state
    python score.py ckpt_path=PATH file=sentences.txt carry_state=true format=json

A line's targets are its tokens and its `<eos>`, read after an `<eos>`; log-probabilities are
natural logs. Writes TSV (line, targets, log_prob, ppl, text) or JSON to `output`, by default
<run dir>/scores.<format>, and prints the total.
"""

import csv
import io
import logging
import math
from itertools import accumulate, pairwise
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lm.config  # noqa: F401 (the option nodes and resolvers that conf/ composes)
from lm.api import LanguageModel
from lm.data.text import read_text, text_lines
from lm.errors import UserError, exit_on_user_error
from lm.evaluation.loading import pick_device
from lm.evaluation.options import ScoreOptions
from lm.evaluation.outputs import output_file, write_whole
from lm.evaluation.scoring import perplexity
from lm.json_output import json_text
from lm.options import defaults, problems, refuse

log = logging.getLogger("score")


def score(cfg: DictConfig) -> dict:
    refuse(problems(ScoreOptions, {key: cfg[key] for key in defaults(ScoreOptions)}, ""))
    device = pick_device(cfg.device)
    path = Path(cfg.file).expanduser()
    run_folder = Path(HydraConfig.get().runtime.output_dir)  # checked by conf/score.yaml's callback
    if cfg.output:
        out = output_file(
            str(cfg.output), "output", {path: "the file being scored"}, left_out="the run folder"
        )
    else:
        out = run_folder / f"scores.{cfg.format}"
    lines = text_lines(read_text(path))
    if not lines:  # as evaluate.py: a file with no line has no target, not even an <eos>
        raise UserError(f"file={path} holds no token to score: it is empty.")
    model = LanguageModel.load(cfg.ckpt_path, device)
    scores = line_scores(model, lines, cfg.carry_state)
    rows = [
        {
            "line": i + 1,
            "targets": targets,
            "log_prob": log_prob,
            "ppl": perplexity(-log_prob, targets),
            "text": text,
        }
        for i, ((targets, log_prob), text) in enumerate(zip(scores, lines, strict=True))
    ]
    targets, log_prob = sum(row["targets"] for row in rows), sum(row["log_prob"] for row in rows)
    total = {
        "targets": targets,
        "log_prob": log_prob,
        "ppl": perplexity(-log_prob, targets) if targets else None,
    }

    write_whole(out, "output", scores_text(cfg, total, rows))
    log.info(
        "%d lines, %d targets, log-probability %.4f, perplexity %s; %s",
        len(rows),
        targets,
        log_prob,
        f"{total['ppl']:.4f}" if targets else "-",
        out,
    )
    return {"total": total, "lines": rows}


def line_scores(model: LanguageModel, lines: list[str], carry_state: bool) -> list[tuple[int, float]]:
    """(targets, log-probability) of each line: its tokens and its `<eos>`. With `carry_state` the
    lines are one text, each read after the one before; without, each from a sentence start."""
    if not carry_state:
        return [(len(scored.log_probs), scored.log_prob) for scored in model.rescore(lines)]
    log_probs = model.score("\n".join(lines)).log_probs
    ends = accumulate(len(model.vocabulary.tokenizer.tokens(line)) + 1 for line in lines)
    return [(end - start, math.fsum(log_probs[start:end])) for start, end in pairwise([0, *ends])]


def scores_text(cfg: DictConfig, total: dict, rows: list[dict]) -> str:
    """The file's contents in `cfg.format`."""
    if cfg.format == "json":
        return json_text(
            {"file": str(cfg.file), "carry_state": cfg.carry_state, "total": total, "lines": rows}
        )
    # Tab-separated; csv quotes a line that holds a tab or a quote, so columns stay aligned.
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow(["line", "targets", "log_prob", "ppl", "text"])
    for row in rows:
        writer.writerow(
            [row["line"], row["targets"], f"{row['log_prob']:.6f}", f"{row['ppl']:.4f}", row["text"]]
        )
    return text.getvalue()


@hydra.main(version_base="1.3", config_path="conf", config_name="score")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    score(cfg)


if __name__ == "__main__":
    main()
