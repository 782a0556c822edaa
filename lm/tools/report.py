"""A sweep's runs side by side, the best first: training runs by validation perplexity, evaluations
(`python evaluate.py -m ...`, one evaluation.json per run) by the perplexity they measured.

python -m lm.tools.report outputs/multirun/2026-11-29/16-05-00
python -m lm.tools.report SWEEP --markdown sweep.md --csv sweep.csv --plot val_curves.png
python -m lm.tools.report outputs/evaluate/multirun/2026-12-02/10-30-00
"""

import argparse
import csv
import json
import math
from pathlib import Path

from lm.tools.plot import plot, run_labels, sort_runs

TRAINING_COLUMNS = (
    "run",
    "overrides",
    "status",
    "val_ppl",
    "test_ppl",
    "epochs",
    "wall_min",
    "tokens_per_sec",
)
EVALUATION_COLUMNS = ("run", "overrides", "status", "split", "ppl", "acc", "targets", "wall_min")


def collect(sweep: Path) -> list[dict]:
    """One row per run folder (a folder with .hydra/) of the sweep, the best first.

    A sweep of evaluate.py (its runs write evaluation.json) is ranked by `ppl`, one of train.py by
    `val_ppl`. A run without its results file is still running, or was killed: it is listed as
    such, last.
    """
    runs = sort_runs([hydra.parent for hydra in Path(sweep).rglob(".hydra") if hydra.is_dir()])
    if not runs:
        raise SystemExit(f"No run folder (one holding .hydra/) in or below {sweep}.")
    evaluations = any((run / "evaluation.json").exists() for run in runs)
    rows = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        job = {"run": run.name.split("_", 1)[0], "overrides": label}  # the job number of <number>_<overrides>
        if evaluations:
            result = read_results(run / "evaluation.json")
            fields = {key: result.get(key) for key in ("ppl", "acc", "targets")}
            fields["split"] = result.get("split", result.get("file"))
        else:
            result = read_results(run / "metrics.json")
            fields = {
                "val_ppl": result.get("val_ppl"),
                "test_ppl": result.get("test_ppl"),
                "epochs": result.get("epochs"),
                "tokens_per_sec": result.get("train_tokens_per_sec"),
            }
        wall = result.get("wall_seconds")
        row = {**job, "status": result.get("status", "completed"), **fields}
        rows.append({**row, "wall_min": wall / 60 if wall is not None else None})
    rank = "ppl" if evaluations else "val_ppl"
    return sorted(rows, key=lambda row: row[rank] if row[rank] is not None else math.inf)


def columns_of(rows: list[dict]) -> tuple[str, ...]:
    return EVALUATION_COLUMNS if "ppl" in rows[0] else TRAINING_COLUMNS


def read_results(path: Path) -> dict:
    if not path.exists():
        return {"status": f"no {path.name}"}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"status": f"unreadable {path.name} ({type(error).__name__})"}


FORMATS = {
    "val_ppl": "{:.2f}",
    "test_ppl": "{:.2f}",
    "ppl": "{:.2f}",
    "acc": "{:.4f}",
    "wall_min": "{:.1f}",
    "tokens_per_sec": "{:,.0f}",
}


def formatted(row: dict, columns: tuple[str, ...]) -> list[str]:
    """Perplexities to two decimals, minutes to one, tokens/s whole; a missing value as "-"."""
    return ["-" if row[c] is None else FORMATS.get(c, "{}").format(row[c]) for c in columns]


def text_table(rows: list[dict]) -> str:
    columns = columns_of(rows)
    cells = [list(columns)] + [formatted(row, columns) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells)
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(rows: list[dict]) -> str:
    columns = columns_of(rows)
    lines = [list(columns), ["---"] * len(columns)] + [formatted(row, columns) for row in rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """Full-precision values, empty where missing: for a spreadsheet or pandas."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns_of(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path, help="a sweep folder (outputs/multirun/<date>/<time>)")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    parser.add_argument("--plot", type=Path, help="validation curves of every run in one figure (PNG)")
    args = parser.parse_args()

    rows = collect(args.sweep)
    if args.plot and columns_of(rows) == EVALUATION_COLUMNS:
        raise SystemExit("--plot draws training curves; the runs of an evaluation sweep have none.")
    print(text_table(rows))
    if args.markdown:
        args.markdown.write_text(markdown_table(rows) + "\n")
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(args.sweep, args.plot, splits=("valid",), title=f"validation perplexity, {args.sweep}")


if __name__ == "__main__":
    main()
