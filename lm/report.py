"""A sweep's runs side by side, the best validation perplexity first.

python -m lm.report outputs/multirun/2026-11-29/16-05-00
python -m lm.report SWEEP --markdown sweep.md --csv sweep.csv --plot val_curves.png
"""

import argparse
import csv
import json
import math
from pathlib import Path

from lm.plot import plot, run_labels, sort_runs

COLUMNS = ("run", "overrides", "status", "val_ppl", "test_ppl", "epochs", "wall_min", "tokens_per_sec")


def collect(sweep: Path) -> list[dict]:
    """One row per run folder (a folder with .hydra/) of the sweep, sorted by validation perplexity.

    A run without metrics.json is still running, or was killed: it is listed as such, last.
    """
    runs = sort_runs([hydra.parent for hydra in Path(sweep).rglob(".hydra") if hydra.is_dir()])
    if not runs:
        raise SystemExit(f"No run folder (one holding .hydra/) in or below {sweep}.")
    rows = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        metrics = read_metrics(run / "metrics.json")
        wall = metrics.get("wall_seconds")
        rows.append(
            {
                "run": run.name.split("_", 1)[0],  # the job number of <number>_<overrides>
                "overrides": label,
                "status": metrics.get("status", "completed"),
                "val_ppl": metrics.get("val_ppl"),
                "test_ppl": metrics.get("test_ppl"),
                "epochs": metrics.get("epochs"),
                "wall_min": wall / 60 if wall is not None else None,
                "tokens_per_sec": metrics.get("train_tokens_per_sec"),
            }
        )
    return sorted(rows, key=lambda row: row["val_ppl"] if row["val_ppl"] is not None else math.inf)


def read_metrics(path: Path) -> dict:
    if not path.exists():
        return {"status": "no metrics.json"}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"status": f"unreadable metrics.json ({type(error).__name__})"}


def formatted(row: dict) -> list[str]:
    """Perplexities to two decimals, minutes to one, tokens/s whole; a missing value as "-"."""
    formats = {"val_ppl": "{:.2f}", "test_ppl": "{:.2f}", "wall_min": "{:.1f}", "tokens_per_sec": "{:,.0f}"}
    return ["-" if row[c] is None else formats.get(c, "{}").format(row[c]) for c in COLUMNS]


def text_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [formatted(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells)
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(rows: list[dict]) -> str:
    lines = [list(COLUMNS), ["---"] * len(COLUMNS)] + [formatted(row) for row in rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """Full-precision values, empty where missing: for a spreadsheet or pandas."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
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
    print(text_table(rows))
    if args.markdown:
        args.markdown.write_text(markdown_table(rows) + "\n")
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(args.sweep, args.plot, splits=("valid",), title=f"validation perplexity, {args.sweep}")


if __name__ == "__main__":
    main()
