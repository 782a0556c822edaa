"""`python -m lm.plot`: per-epoch curves of a run or of every run of a sweep, read from TensorBoard."""

import json
import subprocess
import sys

import pytest

from lm.plot import epoch_curves, find_runs, run_labels
from tests.conftest import TINY_RUN, run_train


def test_a_sweep_gives_one_curve_per_run_labelled_by_its_overrides(tiny_corpus, tmp_path):
    result = run_train(
        "-m",
        *TINY_RUN,
        "model.dropout=0.0,0.3",
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = find_runs(tmp_path / "sweep")
    assert [run.name for run in runs] == ["0", "1"]
    assert run_labels(runs) == ["model.dropout=0.0", "model.dropout=0.3"]

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
        "lm.plot",
        str(tmp_path / "sweep"),
        "--reference",
        "10",
        "--out",
        str(out),
    ]
    assert subprocess.run(command, capture_output=True, text=True).stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    single = subprocess.run([sys.executable, "-m", "lm.plot", str(runs[0])], capture_output=True, text=True)
    assert single.returncode == 0 and (runs[0] / "curves.png").exists()
