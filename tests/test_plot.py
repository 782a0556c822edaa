"""`python -m lm.tools.plot`: per-epoch curves of a run or of every run of a sweep, read from TensorBoard."""

import json
import subprocess
import sys

import pytest

from lm.tools.plot import epoch_curves, find_runs, run_labels


def test_a_sweep_gives_one_curve_per_run_labelled_by_its_overrides(grid_sweep, tmp_path):
    runs = find_runs(grid_sweep)
    assert [run.name.split("_")[0] for run in runs] == ["0", "1"]
    assert run_labels(runs) == ["model.net.dropout=0.0", "model.net.dropout=0.3"]

    for run in runs:
        curves = epoch_curves(run)
        metrics = json.loads((run / "metrics.json").read_text())
        assert [epoch for epoch, _ in curves["val/ppl"]] == [1, 2]
        assert [epoch for epoch, _ in curves["train/epoch_ppl"]] == [1, 2]
        assert min(value for _, value in curves["val/ppl"]) == pytest.approx(metrics["val_ppl"], rel=1e-6)

    out = tmp_path / "curves.png"
    command = [
        sys.executable,
        "-m",
        "lm.tools.plot",
        str(grid_sweep),
        "--reference",
        "10",
        "--out",
        str(out),
    ]
    assert subprocess.run(command, capture_output=True, text=True).stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    single = subprocess.run(
        [sys.executable, "-m", "lm.tools.plot", str(runs[0])], capture_output=True, text=True
    )
    assert single.returncode == 0 and (runs[0] / "curves.png").exists()
