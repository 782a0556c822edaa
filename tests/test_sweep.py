"""Sweeps: one readable folder per run, TensorBoard's HPARAMS, Optuna, bad trials, the report."""

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from lm.training.continuation import resume_argument
from tests.conftest import TINY_RUN, compose_config, run_train, write_tiny_corpus

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
        assert f"model.net.dropout={dropout}" in run.name and "data.dir" not in run.name
        assert (run / ".hydra" / "config.yaml").exists() and (run / "metrics.json").exists()
        assert len(list((run / "checkpoints").glob("*.ckpt"))) == 2

    tensorboard = EventMultiplexer().AddRunsFromDirectory(str(grid_sweep))
    tensorboard.Reload()
    assert sorted(tensorboard.Runs()) == [f"{run.name}/tensorboard" for run in runs]  # names say what changed


def test_a_run_folder_name_is_one_short_folder_name():
    overrides = [f"+note_{i:02d}='0.3000000000000000€'" for i in range(20)]  # 640 bytes once quoted
    cfg = compose_config(*overrides, "+path=a/b", "data.dir=/a/path", "hydra.job.num=7")
    name = cfg.hydra.sweep.subdir
    assert name.startswith("7_+note_00='0.3000000000000000€',") and name.endswith("...")  # no data.dir
    assert len(name.encode()) <= 2 + 150 and "/" not in name
    assert compose_config("+path=a/b", "hydra.job.num=0").hydra.sweep.subdir == "0_+path=a_b"


def test_every_run_logs_its_hyperparameters_and_final_perplexities_for_the_hparams_tab(grid_sweep):
    for run, dropout in zip(runs_of(grid_sweep), (0.0, 0.3), strict=True):
        hparams = session_hparams(run)
        assert hparams["model.net.dropout"] == pytest.approx(dropout)
        assert (hparams["model.net.hidden_size"], hparams["data.batch_size"], hparams["seed"]) == (16, 8, 1)

        metrics = json.loads((run / "metrics.json").read_text())
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        assert events.Scalars("hparams/val_ppl")[0].value == pytest.approx(metrics["val_ppl"], rel=1e-6)
        assert events.Scalars("hparams/test_ppl")[0].value == pytest.approx(metrics["test_ppl"], rel=1e-6)
        ungrouped = [tag for tag in events.Tags()["scalars"] if not tag.startswith(SCALAR_GROUPS)]
        assert sorted(ungrouped) == ["epoch", "lr"]


def test_a_run_that_diverges_or_fails_is_a_bad_value_and_the_sweep_goes_on(tiny_corpus, tmp_path):
    # lr 3e38 overflows the weights at once; a model class that does not exist fails after the start.
    result = run_train(
        "-m",
        *TINY_RUN,
        "model.lr=3e38,1.0",
        "model._target_=lm.training.module.LanguageModel,lm.training.module.Missing",
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    diverged, failed, completed, _ = (
        json.loads((run / "metrics.json").read_text()) for run in runs_of(tmp_path / "sweep")
    )
    assert (diverged["status"], diverged["val_ppl"], diverged["test_ppl"]) == ("diverged", None, None)
    assert diverged["error"] == "the training loss is not finite at step 1 (epoch 1, lr 3e+38)"
    assert failed["status"] == "failed" and "lm.training.module.Missing" in failed["error"]
    assert completed["status"] == "completed" and completed["val_ppl"] > 0
    assert "This run failed; the sweep goes on with val_ppl=inf for it." in result.stdout

    table = tmp_path / "sweep.csv"
    report = subprocess.run(
        [sys.executable, "-m", "lm.tools.report", str(tmp_path / "sweep"), "--csv", str(table)]
    )
    assert report.returncode == 0
    rows = [(row["run"], row["status"]) for row in csv.DictReader(table.open())]
    assert rows == [("2", "completed"), ("0", "diverged"), ("1", "failed"), ("3", "failed")]


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory) -> Path:
    """Two trials of `hparams_search=ptb_optuna` on a tiny corpus (hidden size fixed to stay small)."""
    root = tmp_path_factory.mktemp("optuna")
    corpus = write_tiny_corpus(root / "tiny")
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
        "model.lr": 1.4,
        "model.lr_decay": pytest.approx(0.3),
        "model.decay_after": 10,
    }
    assert (
        configs[0]["model.net.hidden_size"] == configs[1]["model.net.hidden_size"] == 16
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
    command = [sys.executable, "-m", "lm.tools.report", str(optuna_sweep)]
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
        assert (
            "model.net.dropout=" in row["overrides"] and "model.net.hidden_size" not in row["overrides"]
        )  # shared

    markdown = outputs["--markdown"].read_text().splitlines()
    assert (
        markdown[0]
        == "| run | overrides | status | val_ppl | test_ppl | epochs | wall_min | tokens_per_sec |"
    )
    assert len(markdown) == 2 + len(rows)
    assert report.stdout.splitlines()[1].split()[0] == rows[0]["run"]
    assert outputs["--plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_sweep_continues_as_a_sweep_and_ends_as_one_never_stopped(grid_sweep, tmp_path):
    """The second run of `-m model.net.dropout=0.0,0.3` is stopped; the command printed then, pasted
    into a shell, keeps the first run's folder as it was and ends the second as if never stopped."""
    corpus = write_tiny_corpus(tmp_path / "tiny")  # the same text as the reference sweep's
    signal = [
        "+callbacks.signal_at._target_=tests.signal_at.SignalAt",
        "+callbacks.signal_at.point=step",
        "+callbacks.signal_at.step=150",
        f"+callbacks.signal_at.marker={tmp_path / 'fired'}",
        "+callbacks.signal_at.job=1",
    ]
    sweep = tmp_path / "sweep"
    arguments = [*TINY_RUN, "model.net.dropout=0.0,0.3", f"data.dir={corpus}", f"data.cache_dir={tmp_path}/c"]
    stopped = run_train("-m", *arguments, *signal, f"hydra.sweep.dir={sweep}")
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "Stopped by SIGTERM at step 150 (epoch 2)" in stopped.stdout
    first, second = runs_of(sweep)
    kept = {
        path: path.read_bytes() for path in first.rglob("*") if path.is_file() and path.name != "train.log"
    }

    def printed(what: str) -> list[str]:
        return shlex.split(stopped.stdout.split(f"{what}: python train.py ")[1].splitlines()[0])

    alone = OverridesParser.create().parse_overrides(printed("or this run alone with"))
    assert [o.value() for o in alone if o.key_or_group == "resume"] == [str(second)]
    continued = run_train(*printed("Continue the sweep with"))
    assert continued.returncode == 0, continued.stdout + continued.stderr
    assert {path: path.read_bytes() for path in kept} == kept and runs_of(sweep) == [first, second]
    reference = runs_of(grid_sweep)[1]
    metrics, wanted = (json.loads((run / "metrics.json").read_text()) for run in (second, reference))
    for key in ("status", "val_ppl", "test_ppl", "test_acc", "epochs"):
        assert metrics[key] == wanted[key], key
    final, expected = (
        torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
        for run in (second, reference)
    )
    assert all(torch.equal(final[name], tensor) for name, tensor in expected.items())


def test_continue_sweep_outside_a_sweep_is_refused_in_one_line(tmp_path):
    result = run_train(*TINY_RUN, "continue_sweep=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert "continue_sweep=true goes on with an interrupted sweep: give it with -m" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "path",
    [
        "/runs/1_model.net.dropout=0.3,seed=2",
        "/runs/it's",
        "/home/josé/run",
        "~/run",
        "/runs/null",
        "/a/b-c_d",
    ],
)
def test_a_printed_resume_argument_reads_back_as_its_path(path):
    """What a stop prints for resume= is one shell word that Hydra's own parser reads back as the path."""
    (argument,) = shlex.split(resume_argument(Path(path)))
    assert OverridesParser.create().parse_override(argument).value() == path
