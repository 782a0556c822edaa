"""Training learns: on a corpus with a known entropy each network gets close to its true perplexity,
which it can reach only by remembering a word over several steps."""

import random

import lightning as L
import pytest

from lm.data.datamodule import PTBDataModule
from lm.training.module import LanguageModel
from tests.conftest import quiet_trainer, write_corpus

# Each line has 8 words; the word at position i is p{i}a or p{i}b, uniformly at random, and
# <eos> surely follows the last one: 8 bits over 9 targets per line.
TRUE_PERPLEXITY = 2 ** (8 / 9)
# The same lines with the third word's letter that of the first: 7 bits over 9 targets, reached only
# by a network that carries the first letter over two steps (one that cannot stays 2 ** (1 / 9), 8%,
# above: a bigram model learns the coin corpus).
ECHO_PERPLEXITY = 2 ** (7 / 9)
# Each network at a small size, with its training options (Zaremba's summed loss for the LSTM).
NETWORKS = {
    "lstm": (
        {"_target_": "lm.models.lstm.LSTMOptions", "hidden_size": 32, "init_scale": 0.1},
        {"lr": 1.0, "decay_after": 2},
    ),
    "mogrifier": (
        {"_target_": "lm.models.mogrifier.MogrifierOptions", "hidden_size": 32, "init_scale": 0.1},
        {"lr": 1.0, "decay_after": 2},
    ),
    "xlstm": (
        {"_target_": "lm.models.xlstm.XLSTMOptions", "embedding_size": 32, "num_heads": 2},
        {"lr": 1.0, "decay_after": 2, "loss_average": "tokens"},
    ),
}


def coin_lines(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"p{i}{rng.choice('ab')}" for i in range(8)) for _ in range(count)]


def echo_lines(count: int, seed: int) -> list[str]:
    lines = []
    for line in coin_lines(count, seed):
        words = line.split()
        words[2] = words[2][:-1] + words[0][-1]  # p2's letter: p0's
        lines.append(" ".join(words))
    return lines


@pytest.mark.parametrize("name", NETWORKS)
def test_validation_perplexity_approaches_the_true_perplexity(tmp_path, name):
    folder = write_corpus(
        tmp_path / "coins",
        {"train": echo_lines(2000, 0), "valid": echo_lines(300, 1), "test": echo_lines(300, 2)},
    )
    L.seed_everything(0)
    datamodule = PTBDataModule(
        dir=folder, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=8, num_steps=10
    )
    net, training = NETWORKS[name]
    model = LanguageModel(datamodule.vocab_size, net, **training)
    trainer = quiet_trainer(max_epochs=3, gradient_clip_val=5)
    trainer.fit(model, datamodule=datamodule)  # 3 x 224 steps
    val_ppl = trainer.callback_metrics["val/ppl"].item()
    assert ECHO_PERPLEXITY * 0.97 < val_ppl < ECHO_PERPLEXITY * 1.05, val_ppl
