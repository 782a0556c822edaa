"""Batch-1 scoring of an exported model: the eager network against ONNX Runtime, fp32 and int8, in one
run on the same tokens (docs/export.md, "Speed and int8").

python -m lm.tools.bench_onnx FOLDER --file data/ptb/ptb.test.txt
python -m lm.tools.bench_onnx FOLDER --file data/ptb/ptb.test.txt --tokens 20000 --rounds 3 --json bench.json

FOLDER is python -m lm.tools.export's, with onnx=true (and int8=true for the int8 row). Each path
scores the file's tokens as one stream in windows of --window with the state fed back; the paths
take turns for --rounds rounds and each one's best round is its speed, so that a noisy machine
slows all of them alike. Prints each path's tokens/s, its ratio to eager, its perplexity and its
change against eager, and its file's size.
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lm.data.text import read_text
from lm.errors import UserError, exit_on_user_error
from lm.evaluation.loading import load_model
from lm.evaluation.model_folder import WEIGHTS
from lm.evaluation.outputs import output_file, write_whole
from lm.evaluation.scoring import perplexity, score_stream, text_ids
from lm.json_output import json_text
from lm.tools.export import INT8, ONNX
from lm.tools.onnx_export import OnnxScorer


def bench(folder: Path, file: Path, tokens: int | None, window: int, rounds: int) -> dict:
    model = load_model(folder)
    ids, _ = text_ids(read_text(file), model.vocabulary)
    if tokens is not None:
        ids = ids[: tokens + 1]
    if not (folder / ONNX).is_file():
        raise UserError(f"{folder / ONNX} is missing: export with onnx=true (python -m lm.tools.export).")
    cpu = torch.device("cpu")
    paths: dict[str, tuple[Path, Callable[[], torch.Tensor]]] = {
        "eager": (folder / WEIGHTS, lambda: score_stream(model.net, ids, cpu, chunk_length=window).log_probs)
    }
    for name, onnx_file in (("onnxruntime fp32", ONNX), ("onnxruntime int8", INT8)):
        if (folder / onnx_file).is_file():
            scorer = OnnxScorer(folder / onnx_file)
            paths[name] = (folder / onnx_file, lambda scorer=scorer: scorer.log_probs(ids, window))
    seconds = {name: [] for name in paths}
    log_probs = {}
    for _ in range(rounds):
        for name, (_, score) in paths.items():
            started = time.perf_counter()
            log_probs[name] = score()
            seconds[name].append(time.perf_counter() - started)
    targets = len(ids) - 1
    eager_ppl = perplexity(-log_probs["eager"].sum().item(), targets)
    rows = []
    for name, (path, _) in paths.items():
        ppl = perplexity(-log_probs[name].sum().item(), targets)
        rows.append(
            {
                "path": name,
                "tokens_per_sec": targets / min(seconds[name]),
                "speed_ratio": min(seconds["eager"]) / min(seconds[name]),
                "ppl": ppl,
                "ppl_change": ppl / eager_ppl - 1,
                "max_abs_log_prob_diff": (log_probs[name] - log_probs["eager"]).abs().max().item(),
                "file": path.name,
                "file_mb": path.stat().st_size / 1e6,
            }
        )
    return {
        "folder": str(folder),
        "file": str(file),
        "targets": targets,
        "window": window,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "paths": rows,
    }


def text_table(result: dict) -> str:
    lines = [
        f"{result['targets']} targets of {result['file']}, batch 1, windows of {result['window']}, "
        f"{result['threads']} threads, best of {result['rounds']} rounds",
        f"{'path':<18} {'tokens/s':>9} {'x eager':>8} {'ppl':>10} {'ppl change':>11} "
        f"{'max |dlogp|':>12} {'file MB':>8}",
    ]
    for row in result["paths"]:
        lines.append(
            f"{row['path']:<18} {row['tokens_per_sec']:>9.0f} {row['speed_ratio']:>8.2f} {row['ppl']:>10.4f} "
            f"{row['ppl_change']:>+11.4%} {row['max_abs_log_prob_diff']:>12.2e} {row['file_mb']:>8.2f}"
        )
    return "\n".join(lines)


@exit_on_user_error
def main(arguments: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="a model folder exported with onnx=true")
    parser.add_argument("--file", type=Path, required=True, help="the text scored (PTB: ptb.test.txt)")
    parser.add_argument("--tokens", type=int, help="score only the file's first TOKENS targets")
    parser.add_argument("--window", type=int, default=35, help="tokens per call, the state fed back (35)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each path takes; the best counts (3)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    args = parser.parse_args(arguments)
    if args.window < 1 or args.rounds < 1 or (args.tokens is not None and args.tokens < 1):
        raise UserError("--window, --rounds and --tokens must be 1 or more.")
    out = output_file(str(args.json), "--json", {args.file: "the file scored"}) if args.json else None
    result = bench(args.folder, args.file, args.tokens, args.window, args.rounds)
    print(text_table(result))
    if out:
        write_whole(out, "--json", json_text(result))
    return result


if __name__ == "__main__":
    main()
