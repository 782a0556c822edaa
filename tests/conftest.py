"""Shared fixtures: the real PTB when present, small generated corpora, and train.py runs."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Checkpoint
from omegaconf import DictConfig, open_dict

import lm.config  # noqa: F401 (the option nodes and resolvers that conf/ composes)
from lm import PROJECT_ROOT
from lm.data.datamodule import PTBDataModule
from lm.data.text import Tokenizer, read_text, text_tokens
from lm.data.vocabulary import Vocabulary
from lm.models.lstm import LSTMOptions
from lm.training.module import LanguageModel

# The test models are tiny: a second thread only waits on the first (and on a busy machine far worse).
torch.set_num_threads(1)


def compose_config(*overrides: str, config_name: str = "config") -> DictConfig:
    """The config train.py (or the entry point of `config_name`) would get, with `${hydra:...}`
    resolvable as in a real run."""
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def read_tokens(path: Path, tokenizer: Tokenizer = Tokenizer()) -> list[str]:
    """The tokens of every line of a UTF-8 file, each line closed by `<eos>`."""
    return text_tokens(read_text(path), tokenizer)


def build_vocabulary(tokens: list[str], tokenizer: Tokenizer = Tokenizer()) -> Vocabulary:
    """The vocabulary of a list of training tokens, as a prepared corpus's counts give it."""
    return Vocabulary.from_counts(Counter(tokens), tokenizer)


def language_model(vocab_size: int, **options: Any) -> LanguageModel:
    """A LanguageModel of the LSTM network, from one list of options as the presets give them: the
    LSTM's go to its model.net node, the others are training options."""
    lstm = {field.name for field in dataclasses.fields(LSTMOptions)}
    net = {"_target_": "lm.models.lstm.LSTMOptions", **{k: v for k, v in options.items() if k in lstm}}
    return LanguageModel(vocab_size, net, **{k: v for k, v in options.items() if k not in lstm})


def write_corpus(folder: Path, lines: dict[str, list[str]]) -> Path:
    """Write ptb.<split>.txt files (PTB's layout: a leading and a trailing space per line)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_lines in lines.items():
        (folder / f"ptb.{split}.txt").write_text("".join(f" {line} \n" for line in split_lines))
    return folder


def random_lines(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "the cat dog sat on mat a big small red".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(count)]


def write_tiny_corpus(folder: Path, train_lines: int = 2000) -> Path:
    """About 17k / 1.7k / 1.7k tokens of random words: enough for a few windows of every split."""
    return write_corpus(
        folder,
        {"train": random_lines(train_lines, 0), "valid": random_lines(200, 1), "test": random_lines(200, 2)},
    )


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    return write_tiny_corpus(tmp_path / "tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """An untrained model's checkpoint, saved the way train.py saves one, and its corpus: for the
    tests of evaluate.py (tests/test_adaptation.py's run_evaluate), which need no trained model."""
    root = tmp_path_factory.mktemp("untrained")
    corpus = write_tiny_corpus(root / "tiny", train_lines=500)
    datamodule = PTBDataModule(dir=corpus, cache_dir=root / "cache", url="file:///nowhere")
    torch.manual_seed(0)
    model = language_model(len(datamodule.vocabulary), hidden_size=16, init_scale=0.3)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(root / "model.ckpt")
    return {
        "root": root,
        "ckpt": root / "model.ckpt",
        "data": [f"data.dir={corpus}", f"data.cache_dir={root / 'cache'}"],
    }


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A word model trained by train.py on a text folder (data=text), with what it reported; once per
    worker for the tools' tests (tests/test_apps.py, tests/test_export.py)."""
    root = tmp_path_factory.mktemp("apps")
    text = root / "text"
    text.mkdir()
    for split, (count, seed) in {"train": (2000, 0), "valid": (200, 1), "test": (200, 2)}.items():
        (text / f"{split}.txt").write_text("".join(f"{line}\n" for line in random_lines(count, seed)))
    data = ["data=text", f"data.dir={text}", f"data.cache_dir={root / 'cache'}"]
    result = run_train(*TINY_RUN, *data, "trainer.max_epochs=3", f"hydra.run.dir={root / 'run'}")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    return {"root": root, "data": data, "text": text, "metrics": metrics, "ckpt": metrics["best_checkpoint"]}


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    """$PTB_DIR (CI sets it, and then PTB must be there), else where train.py downloads it."""
    if "PTB_DIR" in os.environ:
        path = Path(os.environ["PTB_DIR"])
        assert (path / "ptb.train.txt").exists(), f"PTB_DIR={path} holds no ptb.train.txt"
        return path
    path = PROJECT_ROOT / "data" / "ptb"
    if not (path / "ptb.train.txt").exists():
        pytest.skip(f"no PTB at {path}: run `python train.py` once, or set PTB_DIR")
    return path


def quiet_trainer(accelerator: str = "cpu", **kwargs) -> L.Trainer:
    """An in-process Trainer, on the CPU unless asked (tests/test_gpu.py), that writes nothing and
    prints little."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in kwargs.get("callbacks", [])),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def app_config(name: str, out: Path, *overrides: str):
    """A tool's configuration (evaluate.py, generate.py, score.py) and run folder `out`, as Hydra
    gives them, for the tool's function in this process."""
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    out.mkdir(parents=True)
    return cfg


# Small enough that a run on the tiny corpus takes seconds.
TINY_RUN = [
    "model.net.hidden_size=16",
    "data.batch_size=8",
    "data.num_steps=20",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# The other networks from their CPU presets, as small: TINY_RUN with these for its LSTM's key.
TINY_NETWORKS = {
    "mogrifier": ["model=mogrifier_cpu", "model.net.hidden_size=16", "model.net.embedding_size=16"],
    "xlstm": [
        "model=xlstm_cpu",
        "model.net.embedding_size=16",
        "model.net.num_heads=2",
        "model.net.num_blocks=2",
    ],
}


def tiny_run(network: str) -> list[str]:
    """TINY_RUN for `network` (lstm, or one of TINY_NETWORKS)."""
    if network == "lstm":
        return TINY_RUN
    return [*(a for a in TINY_RUN if not a.startswith("model.net.")), *TINY_NETWORKS[network]]


def run_train(
    *overrides: str,
    cwd: Path = PROJECT_ROOT,
    env: dict | None = None,
    gpu: bool = False,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`python train.py` as a user runs it, in a subprocess; its log is in `.stdout`."""
    return run_script("train.py", *overrides, cwd=cwd, env=env, gpu=gpu, prefix=prefix)


def run_script(
    script: str,
    *overrides: str,
    cwd: Path = PROJECT_ROOT,
    env: dict | None = None,
    gpu: bool = False,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`python <script>` (train.py, evaluate.py, ...) in a subprocess, on the CPU as in CI unless
    `gpu` (tests/test_gpu.py); `env` replaces the environment; `prefix` is a command that runs it
    (one that limits it, say)."""
    # CPU only, as CI: the same numbers on any machine, and the no-GPU error path is real.
    env = {**(env or os.environ), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [*prefix, sys.executable, str(PROJECT_ROOT / script), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def grid_sweep(tmp_path_factory) -> Path:
    """`python train.py -m model.net.dropout=0.0,0.3` on a tiny corpus: a sweep folder of two runs."""
    root = tmp_path_factory.mktemp("grid")
    corpus = write_tiny_corpus(root / "tiny")
    result = run_train(
        "-m",
        *TINY_RUN,
        "model.net.dropout=0.0,0.3",
        f"data.dir={corpus}",
        f"data.cache_dir={root / 'cache'}",
        f"hydra.sweep.dir={root / 'sweep'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "sweep"
