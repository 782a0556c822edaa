"""`python -m lm.tools.bench` runs on any corpus and reports consistent figures."""

import json
import os
import subprocess
import sys

import pytest

from lm import PROJECT_ROOT
from lm.tools.bench import flops_per_token


def test_flops_per_token_counts_the_matrix_multiplies():
    # small preset: 2 layers of [x, h] (400) x 4 gates (800), decoder 200 x 10,000; x3 for backward
    assert flops_per_token(10_000, 200, 2) == 3 * (2 * 2 * 400 * 800 + 2 * 200 * 10_000) == 15_840_000


def test_the_benchmark_writes_its_table(tiny_corpus, tmp_path):
    overrides = [
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'bench'}",
        "model.hidden_size=16",
        "data.batch_size=8",
        "bench.warmup_steps=5",
        "bench.train_steps=20",
        "bench.matmul_size=128",
        "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "lm.tools.bench", *overrides],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["timed_train_steps_per_path"] == 20
    assert (
        bench["test_batch1_tokens"]
        == sum(len(line.split()) + 1 for line in open(tiny_corpus / "ptb.test.txt")) - 1
    )
    assert len(bench["matmul_gflops_probes"]) == 3  # before the rounds and after each of the two
    assert "lightning_over_plain" in result.stdout
    assert bench["test_tokens_scored"] == bench["test_batch1_tokens"]  # the tiny test split, whole
    passes = bench["plain_pass_seconds"], bench["dynamic_eval_pass_seconds"]
    assert bench["dynamic_eval_over_plain"] == pytest.approx(passes[1] / passes[0]) and min(passes) > 0
    assert "dynamic_eval_over_plain" in result.stdout


def test_the_scale_benchmark_measures_every_phase(tmp_path):
    # A corpus of WikiText-103's shape in miniature: every phase runs and reports its figures.
    command = [
        sys.executable,
        "-m",
        "lm.tools.bench_scale",
        "--work",
        str(tmp_path),
        "--train-tokens",
        "30000",
    ]
    command += ["--types", "400", "--cutoffs", "50", "200", "--hidden-size", "16", "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    bench = json.loads((tmp_path / "bench_scale.json").read_text())
    assert bench["prepare"]["train_tokens"] == 30_000 and bench["prepare"]["types"] <= 400
    assert bench["cached_start"]["types"] == bench["prepare"]["types"]
    assert bench["train"]["adaptive_over_full"] > 0 and bench["train"]["full_train_tokens_per_sec"] > 0
    assert json.loads((tmp_path / "train_py_warm" / "metrics.json").read_text())["status"] == "completed"
