"""Sweeps: one readable folder per run, TensorBoard's HPARAMS, Optuna, bad trials, the report."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import TINY_RUN, compose_config, random_lines, run_train, write_corpus

SCALAR_GROUPS = ("train/", "val/", "test/", "throughput/", "hparams/")


def runs_of(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))


def session_hparams(run: Path) -> dict:
    """The hyper-parameters TensorBoard's HPARAMS tab shows for the run, read from its event files."""
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {
        key: value.number_value if value.HasField("number_value") else value.string_value
        for key, value in hparams.items()
    }


def test_each_run_of_a_sweep_has_its_own_complete_folder_named_by_its_overrides(grid_sweep):
    runs = runs_of(grid_sweep)
    assert [run.name.split("_")[0] for run in runs] == ["0", "1"]
    for run, dropout in zip(runs, ("0.0", "0.3"), strict=True):
        assert f"model.dropout={dropout}" in run.name and "data.dir" not in run.name
        assert (run / ".hydra" / "config.yaml").exists() and (run / "metrics.json").exists()
        assert len(list((run / "checkpoints").glob("*.ckpt"))) == 2

    tensorboard = EventMultiplexer().AddRunsFromDirectory(str(grid_sweep))
    tensorboard.Reload()
    assert sorted(tensorboard.Runs()) == [f"{run.name}/tensorboard" for run in runs]  # names say what changed


def test_a_run_folder_name_is_cut_to_fit_the_file_system():
    overrides = [f"+note_{i:02d}=0.30000000000000004" for i in range(20)]  # 600 characters
    name = ",".join(overrides)  # data.dir is left out
    cfg = compose_config(*overrides, "data.dir=/a/path", "hydra.job.num=7")
    assert cfg.hydra.sweep.subdir == "7_" + name[:147] + "..."


def test_every_run_logs_its_hyperparameters_and_final_perplexities_for_the_hparams_tab(grid_sweep):
    for run, dropout in zip(runs_of(grid_sweep), (0.0, 0.3), strict=True):
        hparams = session_hparams(run)
        assert hparams["model.dropout"] == pytest.approx(dropout)
        assert (hparams["model.hidden_size"], hparams["data.batch_size"], hparams["seed"]) == (16, 8, 1)

        metrics = json.loads((run / "metrics.json").read_text())
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        assert events.Scalars("hparams/val_ppl")[0].value == pytest.approx(metrics["val_ppl"], rel=1e-6)
        assert events.Scalars("hparams/test_ppl")[0].value == pytest.approx(metrics["test_ppl"], rel=1e-6)
        ungrouped = [tag for tag in events.Tags()["scalars"] if not tag.startswith(SCALAR_GROUPS)]
        assert sorted(ungrouped) == ["epoch", "lr"]


def test_a_run_that_diverges_or_fails_is_a_bad_value_and_the_sweep_goes_on(tiny_corpus, tmp_path):
    # lr 1e30 diverges; lr "nope" fails inside the optimiser, after the run has started.
    result = run_train(
        "-m",
        *TINY_RUN,
        "model.init_scale=10",
        "model.lr=1e30,nope,1.0",
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    diverged, failed, completed = (
        json.loads((run / "metrics.json").read_text()) for run in runs_of(tmp_path / "sweep")
    )
    assert (diverged["status"], diverged["val_ppl"], diverged["test_ppl"]) == ("diverged", None, None)
    assert failed["status"] == "failed" and failed["error"].startswith("TypeError: '<' not supported")
    assert completed["status"] == "completed" and completed["val_ppl"] > 0
    assert "This run failed; the sweep goes on with val_ppl=inf for it." in result.stdout

    report = subprocess.run(
        [sys.executable, "-m", "lm.report", str(tmp_path / "sweep")], capture_output=True, text=True
    )
    lines = report.stdout.splitlines()
    assert [line.split()[:3] for line in lines[1:]] == [
        ["2", "model.lr=1.0", "completed"],
        ["0", "model.lr=1e+30", "diverged"],
        ["1", "model.lr=nope", "failed"],
    ]


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory) -> Path:
    """Two trials of `hparams_search=ptb_optuna` on a tiny corpus (hidden size fixed to stay small)."""
    root = tmp_path_factory.mktemp("optuna")
    corpus = write_corpus(
        root / "tiny",
        {"train": random_lines(2000, 0), "valid": random_lines(200, 1), "test": random_lines(200, 2)},
    )
    result = run_train(
        "-m",
        "hparams_search=ptb_optuna",
        "hydra.sweeper.n_trials=2",
        *TINY_RUN,
        f"data.dir={corpus}",
        f"data.cache_dir={root / 'cache'}",
        f"hydra.sweep.dir={root / 'sweep'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "sweep"


def test_optuna_samples_the_search_space_with_a_fixed_seed_and_keeps_the_best(optuna_sweep):
    runs = runs_of(optuna_sweep)
    assert len(runs) == 2
    configs = [session_hparams(run) for run in runs]
    # TPE's first trial is random, drawn from the sampler seeded in the config: always the same.
    assert {key: configs[0][key] for key in ("model.lr", "model.lr_decay", "model.decay_after")} == {
        "model.lr": 0.5,
        "model.lr_decay": pytest.approx(0.4),
        "model.decay_after": 5,
    }
    assert (
        configs[0]["model.hidden_size"] == configs[1]["model.hidden_size"] == 16
    )  # fixed on the command line

    results = (optuna_sweep / "optimization_results.yaml").read_text()
    val_ppl = [json.loads((run / "metrics.json").read_text())["val_ppl"] for run in runs]
    assert f"best_value: {min(val_ppl)}" in results


def test_the_report_ranks_the_runs_and_writes_markdown_csv_and_curves(optuna_sweep, tmp_path):
    outputs = {
        "--markdown": tmp_path / "sweep.md",
        "--csv": tmp_path / "sweep.csv",
        "--plot": tmp_path / "val.png",
    }
    command = [sys.executable, "-m", "lm.report", str(optuna_sweep)]
    for option, path in outputs.items():
        command += [option, str(path)]
    report = subprocess.run(command, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr

    rows = list(csv.DictReader(outputs["--csv"].open()))
    metrics = {
        run.name.split("_")[0]: json.loads((run / "metrics.json").read_text())
        for run in runs_of(optuna_sweep)
    }
    assert [float(row["val_ppl"]) for row in rows] == sorted(m["val_ppl"] for m in metrics.values())
    for row in rows:
        run = metrics[row["run"]]
        assert float(row["test_ppl"]) == run["test_ppl"] and int(row["epochs"]) == run["epochs"] == 2
        assert float(row["tokens_per_sec"]) == run["train_tokens_per_sec"]
        assert "model.dropout=" in row["overrides"] and "model.hidden_size" not in row["overrides"]  # shared

    markdown = outputs["--markdown"].read_text().splitlines()
    assert (
        markdown[0]
        == "| run | overrides | status | val_ppl | test_ppl | epochs | wall_min | tokens_per_sec |"
    )
    assert len(markdown) == 2 + len(rows)
    assert report.stdout.splitlines()[1].split()[0] == rows[0]["run"]
    assert outputs["--plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
