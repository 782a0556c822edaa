"""Learning curves from the TensorBoard event files of a run or of a whole sweep.

python -m lm.tools.plot outputs/2026-11-29/16-05-00 --reference 114.5 --out curves.png
python -m lm.tools.plot outputs/multirun/2026-11-29/16-05-00          # one line per run
"""

import argparse
import re
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def find_runs(folder: Path) -> list[Path]:
    """Run folders (those holding tensorboard/) in `folder` or below it, in job order."""
    runs = [logs.parent for logs in Path(folder).rglob("tensorboard") if logs.is_dir()]
    if not runs:
        raise SystemExit(f"No run with a tensorboard/ folder in or below {folder}.")
    return sort_runs(runs)


def sort_runs(runs: list[Path]) -> list[Path]:
    """By path, numbers compared as numbers: a sweep's job 10_... after job 9_..."""

    def key(part: str) -> tuple[int, str]:
        number = re.match(r"\d+", part)
        return (int(number.group()) if number else -1, part)

    return sorted(runs, key=lambda run: [key(part) for part in run.parts])


def run_labels(runs: list[Path]) -> list[str]:
    """The overrides (.hydra/overrides.yaml) that tell the runs apart, else the folder names."""

    def overrides(run: Path) -> list[str]:
        path = run / ".hydra" / "overrides.yaml"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line.removeprefix("- ").strip() for line in lines if line.strip()]

    all_overrides = [overrides(run) for run in runs]
    shared = set.intersection(*(set(o) for o in all_overrides))
    labels = [" ".join(o for o in run_overrides if o not in shared) for run_overrides in all_overrides]
    return labels if all(labels) and len(set(labels)) == len(runs) else [run.name for run in runs]


def epoch_curves(run: Path) -> dict[str, list[tuple[float, float]]]:
    """{tag: [(epoch, value)]} for the per-epoch perplexities; epoch 1 is the first."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    epoch_at_step = {event.step: event.value for event in events.Scalars("epoch")} if "epoch" in tags else {}
    curves = {}
    for tag in ("train/epoch_ppl", "val/ppl"):
        if tag in tags:
            curves[tag] = [
                (epoch_at_step.get(e.step, i) + 1, e.value) for i, e in enumerate(events.Scalars(tag))
            ]
    return curves


def plot(
    folder: Path,
    out: Path,
    reference: float | None = None,
    title: str | None = None,
    splits: tuple[str, ...] = ("train", "valid"),
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = find_runs(folder)
    labels = run_labels(runs) if len(runs) > 1 else [""]
    for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
        curves = epoch_curves(run)
        color = f"C{index % 10}"
        for tag, style, name in (("train/epoch_ppl", "--", "train"), ("val/ppl", "-", "valid")):
            if tag in curves and name in splits:
                epochs, values = zip(*curves[tag], strict=True)
                ax.plot(epochs, values, style, color=color, marker="o", markersize=3, label=f"{name} {label}")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle=":", label=f"test {reference:g} (reference)")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 120, not 1.2 x 10^2
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_title(title or str(folder))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="a run folder, or a sweep folder holding several")
    parser.add_argument("--out", type=Path, help="image to write (default: FOLDER/curves.png)")
    parser.add_argument("--reference", type=float, help="a test perplexity to draw: a paper's or a run's")
    parser.add_argument("--title", help="figure title (default: the folder)")
    args = parser.parse_args()
    print(plot(args.folder, args.out or args.folder / "curves.png", args.reference, args.title))


if __name__ == "__main__":
    main()
