"""scripts/gpu-check: its dry mode runs every stage on the CPU at tiny sizes, so that the script
cannot fail on a typo when a GPU is lent; a stage that fails or overruns is recorded and the
next one runs."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

from lm import PROJECT_ROOT
from lm.training.trainer import cpu_runs_bf16_lstm

SCRIPT = PROJECT_ROOT / "scripts" / "gpu-check"


@pytest.fixture
def gpu_check():
    """The script as a module (its file has no .py)."""
    loader = SourceFileLoader("gpu_check", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def test_the_dry_mode_runs_every_stage_and_leaves_what_the_device_tool_brings_back(gpu_check, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    log = (out / "gpu-check.log").read_text() if (out / "gpu-check.log").exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log
    report = (out / "gpu-check.md").read_text()
    for stage in ("environment", "GPU tests", "benchmark", "benchmark, Mogrifier and xLSTM", "model=medium"):
        assert f"| {stage} | passed |" in report
    # Every GPU test ran and skipped (no GPU in --dry), none failed: as many as pytest collects.
    gpu_tests = gpu_test_count()
    assert gpu_tests > 0
    row = rf"\| GPU tests \| passed \| \d+ \| 0 passed, 0 failed, {gpu_tests} skipped; exit status 0 \|"
    assert re.search(row, report), report
    bench = json.loads((out / "bench.json").read_text())
    presets = gpu_check.PRESETS + gpu_check.DRY_NETWORK_PRESETS
    jobs = [(preset, precision) for preset in presets for precision in gpu_check.PRECISIONS]
    assert [(job["model"], job["precision"]) for job in bench] == jobs
    # bf16 where this CPU's LSTM has no bfloat16 kernel: skipped with the reason, not failed.
    skipped = [job for job in bench if "skipped" in job]
    assert {job["precision"] for job in skipped} <= {"bf16-mixed"} and bool(skipped) != cpu_runs_bf16_lstm()
    measured = [job for job in bench if "skipped" not in job]
    assert all(
        job["lightning_train_tokens_per_sec"] > 0 and job["test_batch1_seconds"] > 0 for job in measured
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and 1 <= metrics["epochs"] < 39  # stopped by trainer.max_time
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # fit and test
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8 and all(path.stat().st_size < 16 * 2**20 for path in files)  # the tool's limits


def gpu_test_count() -> int:
    """The tests that the script's GPU stage runs (`-m gpu tests/test_gpu.py`), as pytest collects them."""
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/test_gpu.py"]
        + ["-p", "no:cacheprovider"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    return sum(line.startswith("tests/test_gpu.py::") for line in collected.stdout.splitlines())


def test_a_stage_that_fails_overruns_or_raises_is_recorded_and_the_next_one_runs(gpu_check, tmp_path):
    check = gpu_check.Check(tmp_path, tmp_path, 60, dry=True, title="a test", env=dict(os.environ))
    python = [sys.executable, "-c"]
    hang = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    started = time.monotonic()
    check.stage(
        "exits 3",
        lambda check: ("failed", gpu_check.outcome(check.run([*python, "raise SystemExit(3)"], 30))),
    )
    check.stage("hangs", lambda check: ("failed", gpu_check.outcome(check.run([*python, hang], 1))))
    check.stage("raises", lambda check: 1 / 0)
    check.stage("passes", lambda check: ("passed", "fine"))
    assert time.monotonic() - started < 20  # the one that hung was killed, with the process it started
    assert [(stage["name"], stage["status"], stage["note"]) for stage in check.stages] == [
        ("exits 3", "failed", "exit status 3"),
        ("hangs", "failed", "killed: out of time"),
        ("raises", "failed", "ZeroDivisionError: division by zero"),
        ("passes", "passed", "fine"),
    ]
    assert check.failed
    assert "| raises | failed |" in (tmp_path / "gpu-check.md").read_text()  # rewritten after each stage


def test_a_benchmark_job_the_machine_cannot_run_is_reported_as_skipped(gpu_check, tmp_path, monkeypatch):
    def run(
        check, command, seconds, stdout=None
    ):  # the benchmark sweep's jobs, as lm.tools.bench writes them
        if stdout:
            stdout.write_text(json.dumps({"gpu": None}))
        if "lm.tools.bench" in command:
            sweep = Path(next(c for c in command if c.startswith("hydra.sweep.dir=")).split("=", 1)[1])
            jobs = [(preset, precision) for preset in gpu_check.PRESETS for precision in gpu_check.PRECISIONS]
            for number, (preset, precision) in enumerate(jobs):
                job = {"model": preset, "precision": precision}
                if precision == "bf16-mixed":
                    job["skipped"] = "trainer.precision=bf16-mixed cannot run on this CPU: ..."
                else:
                    job.update(dict.fromkeys(MEASURED, 1.0), matmul_dtype="float32", gpu_peak_memory_mib=None)
                (sweep / str(number)).mkdir(parents=True)
                (sweep / str(number) / "bench.json").write_text(json.dumps(job))
        return 0

    monkeypatch.setattr(gpu_check.Check, "run", run)
    check = gpu_check.Check(tmp_path, tmp_path, 60, dry=True, title="a test", env=dict(os.environ))
    check.stage("environment", gpu_check.environment)
    check.stage("benchmark", gpu_check.benchmark)
    assert check.stages[-1]["status"] == "passed", check.stages
    assert check.stages[-1]["note"].startswith(
        "3 of 6 jobs measured; exit status 0; small bf16-mixed skipped"
    )
    report = (tmp_path / "gpu-check.md").read_text()
    assert (
        "| medium | bf16-mixed | skipped: trainer.precision=bf16-mixed cannot run on this CPU: ... |"
        in report
    )


MEASURED = [
    "lightning_train_tokens_per_sec",
    "plain_loop_train_tokens_per_sec",
    "lightning_over_plain",
    "matmul_gflops",
    "lightning_fraction_of_matmul",
    "val_tokens_per_sec",
    "test_batch1_seconds",
]


def test_the_large_mode_trains_model_large_alone(gpu_check, tmp_path, monkeypatch):
    commands = []

    def run(check, command, seconds, stdout=None):  # nothing runs; the probe finds no GPU
        commands.append(command)
        if stdout:
            stdout.write_text(json.dumps({"gpu": None}))
        return 0

    monkeypatch.setattr(gpu_check.Check, "run", run)
    assert gpu_check.main(["--large", "--dry", str(tmp_path)]) == 1  # no train.py ran: no metrics.json
    trained = [command for command in commands if "train.py" in command]
    assert len(trained) == 1 and {"model=large", "trainer.max_time=00:00:00:03"} <= set(trained[0])
    assert not any("pytest" in command or "lm.tools.bench" in command for command in commands)
    assert "| model=large | failed | " in (tmp_path / "gpu-check.md").read_text()
