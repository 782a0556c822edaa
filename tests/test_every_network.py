"""Every tool works with every network (the LSTM's own tests are elsewhere): a run trained by
a train.py sweep is evaluated (plain, dynamic evaluation, the cache, both), scored, sampled from
and benchmarked, and trains on two processes as on one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluate import evaluate
from generate import generate
from lm import PROJECT_ROOT
from score import score
from tests.conftest import TINY_NETWORKS, app_config, random_lines, run_train, tiny_run, write_tiny_corpus
from tests.test_distributed import TOLERANCE, TWO_PROCESSES, scalars

pytestmark = pytest.mark.slow
# Every dropout off, and an lr at which float32's rounding (which differs between one and two
# processes) does not grow: the two-process run must give the one-process numbers.
EXACT = {
    "mogrifier": [f"model.net.{key}=0" for key in ("input_dropout", "hidden_dropout", "weight_drop")],
    "xlstm": [],
}
EXACT_ANY = [
    "model.net.dropout=0",
    "model.net.output_dropout=0",
    "model.net.embedding_dropout=0",
    "model.lr=0.1",
]


@pytest.fixture(scope="module", params=sorted(TINY_NETWORKS))
def trained(request, tmp_path_factory) -> dict:
    """A tiny run of the network through train.py, every step logged."""
    root = tmp_path_factory.mktemp(request.param)
    corpus = write_tiny_corpus(root / "tiny", train_lines=600)  # 30 windows an epoch
    data = [f"data.dir={corpus}", f"data.cache_dir={root / 'cache'}"]
    overrides = [
        *tiny_run(request.param),
        *EXACT_ANY,
        *EXACT[request.param],
        *data,
        "trainer.log_every_n_steps=1",
    ]
    # A sweep (of one run, as cheap as one): a user sweeps a network's options this way.
    result = run_train("-m", *overrides, "seed=1", f"hydra.sweep.dir={root}", "hydra.sweep.subdir=run")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    return {"network": request.param, "root": root, "overrides": overrides, "data": data, "metrics": metrics}


def run_evaluate(trained: dict, out: Path, *overrides: str) -> dict:
    return evaluate(
        app_config(
            "evaluate",
            out,
            f"ckpt_path={trained['metrics']['best_checkpoint']}",
            *trained["data"],
            *overrides,
        )
    )


def test_evaluate_gives_the_test_perplexity_train_reported_and_every_adaptation_runs(trained, tmp_path):
    plain = run_evaluate(trained, tmp_path / "plain")
    # The same windows, their log-probabilities summed in float64 here and in float32 by train.py.
    assert plain["ppl"] == pytest.approx(trained["metrics"]["test_ppl"], rel=1e-8)
    dynamic = ["dynamic_eval.method=rms", "dynamic_eval.lr=0.001", "dynamic_eval.stats_batches=5"]
    cache = ["cache.window=50", "cache.lambda=0.1", "cache.theta=0.3"]
    runs = {
        "sgd_lr_0": ["dynamic_eval.method=sgd", "dynamic_eval.lr=0"],  # adapts nothing
        "cache_lambda_0": ["cache.window=50", "cache.lambda=0", "cache.theta=0.3"],
        "dynamic": dynamic,
        "cache": cache,
        "both": [*dynamic, *cache],
    }
    ppl = {
        name: run_evaluate(trained, tmp_path / name, *overrides)["ppl"] for name, overrides in runs.items()
    }
    # Dynamic evaluation reads the stream in segments of 5 where the plain pass reads 200 tokens, and
    # the cache normalises the whole distribution itself: the same functions (tests/test_networks.py
    # checks the windows in float64), rounded otherwise in float32.
    assert ppl["sgd_lr_0"] == pytest.approx(plain["ppl"], rel=1e-7)
    assert ppl["cache_lambda_0"] == pytest.approx(plain["ppl"], rel=1e-7)
    for name in ("dynamic", "cache", "both"):  # each changes the scores
        assert 1 < ppl[name] < 1e6 and abs(ppl[name] / plain["ppl"] - 1) > 1e-6, (name, ppl)


def test_score_and_evaluate_give_a_file_the_same_log_probability(trained, tmp_path):
    file = tmp_path / "lines.txt"
    file.write_text("".join(f"{line}\n" for line in random_lines(20, 5)))
    ckpt = f"ckpt_path={trained['metrics']['best_checkpoint']}"
    scored = score(app_config("score", tmp_path / "score", ckpt, f"file={file}", "carry_state=true"))
    evaluated = run_evaluate(trained, tmp_path / "evaluate", f"file={file}")
    # evaluate.py scores the file as one stream after an <eos>, as score.py's carried state does.
    assert scored["total"]["targets"] == evaluated["targets"]
    assert scored["total"]["ppl"] == pytest.approx(evaluated["ppl"], rel=1e-9)


def test_generate_repeats_its_text_for_one_seed(trained, tmp_path):
    def text(name: str, *options: str) -> list[str]:
        ckpt = f"ckpt_path={trained['metrics']['best_checkpoint']}"
        return generate(
            app_config("generate", tmp_path / name, ckpt, "prompt=the cat", "num_words=20", *options)
        )

    sampled = ["temperature=0.8", "num_samples=3", "seed=4"]
    first = text("first", *sampled)
    assert first == text("again", *sampled) and len(first) == 3
    assert text("greedy", "temperature=0") == text("greedy-again", "temperature=0")


def test_the_benchmark_runs_the_network_against_its_plain_loop(trained, tmp_path):
    overrides = [
        *trained["overrides"],
        f"hydra.run.dir={tmp_path / 'bench'}",
        "bench.warmup_steps=2",
        "bench.train_steps=6",
        "bench.matmul_size=64",
        "bench.rounds=1",
        "bench.dynamic_eval_tokens=100",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "lm.tools.bench", *overrides]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["lightning_over_plain"] > 0 and bench["test_tokens_scored"] > 0


def test_two_processes_give_the_one_process_numbers(trained):
    work = trained["root"] / "two"
    work.mkdir()
    result = run_train(*trained["overrides"], *TWO_PROCESSES, cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    (two,) = (work / "outputs").glob("*/*")
    for tag in ("train/loss", "val/ppl", "test/ppl"):
        one, other = scalars(trained["root"] / "run", tag), scalars(two, tag)
        assert [step for step, _ in other] == [step for step, _ in one]
        assert [value for _, value in other] == pytest.approx([value for _, value in one], rel=TOLERANCE)
