"""`python -m lm.tools.bench` runs on any corpus and reports consistent figures."""

import json
import math
import os
import subprocess
import sys

from lm import PROJECT_ROOT
from lm.models.lstm import LSTMNetwork, LSTMOptions
from lm.training.summary import flops_per_token


def test_flops_per_token_counts_the_matrix_multiplies_of_the_network_built():
    # small preset: 2 layers of [x, h] (400) x 4 gates (800), decoder 200 x 10,000; x3 for backward
    small = LSTMNetwork(10_000, LSTMOptions(hidden_size=200))
    assert flops_per_token(small) == 3 * (2 * 2 * 400 * 800 + 2 * 200 * 10_000) == 15_840_000
    # awd_cpu's shapes: embedding 200, a first layer of 512, a last of 200 for the tied decoder.
    # Layer 1: [x, h] = 200 + 512 = 712 into 4 x 512 = 2,048 gates: 2 x 712 x 2,048 = 2,916,352.
    # Layer 2: [x, h] = 512 + 200 = 712 into 4 x 200 = 800 gates:   2 x 712 x   800 = 1,139,200.
    # Decoder: 200 into 10,000 logits:                               2 x 200 x 10,000 = 4,000,000.
    # Forward 8,055,552; with backward (twice the forward) 24,166,656.
    awd_cpu = LSTMNetwork(10_000, LSTMOptions(hidden_size=512, tie_weights=True, embedding_size=200))
    assert flops_per_token(awd_cpu) == 24_166_656
    # The adaptive softmax's cost depends on the targets: no figure rather than a wrong one.
    adaptive = LSTMNetwork(10_000, LSTMOptions(hidden_size=200, softmax="adaptive", cutoffs=[2_000]))
    assert math.isnan(flops_per_token(adaptive))


def test_the_benchmark_writes_its_table(tiny_corpus, tmp_path):
    overrides = [
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'bench'}",
        "model.net.hidden_size=16",
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
    # Dynamic evaluation does strictly more per token than the plain pass: segments of 5 tokens
    # where the plain pass scores 200 at once, each followed by a backward and an update. At least
    # twice as slow on any machine (here some 80 times); a dynamic pass that adapted nothing reads
    # about 1. The table prints the figure bench.json holds.
    assert bench["dynamic_eval_pass_seconds"] > 2 * bench["plain_pass_seconds"] > 0
    assert bench["dynamic_eval_over_plain"] > 2
    assert printed(result.stdout, "dynamic_eval_over_plain") == round(bench["dynamic_eval_over_plain"], 3)
    # The tiny corpus has 12 words; hidden 16, 2 layers: 3 x (2 x 2 x 32 x 64 + 2 x 16 x 12) = 25,728.
    assert printed(result.stdout, "train_flops_per_token") == bench["train_flops_per_token"] == 25_728


def printed(table: str, key: str) -> float:
    """The figure on `key`'s line of the benchmark's table."""
    line = next(line for line in table.splitlines() if line.split()[:1] == [key])
    return float(line.split()[1].replace(",", ""))


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
