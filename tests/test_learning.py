"""Training learns: on a corpus with a known entropy the model gets close to its true perplexity."""

import random

import lightning as L

from lm.data.datamodule import PTBDataModule
from tests.conftest import language_model, quiet_trainer, write_corpus

# Each line has 8 words; the word at position i is p{i}a or p{i}b, uniformly at random, and
# <eos> surely follows the last one: 8 bits over 9 targets per line.
TRUE_PERPLEXITY = 2 ** (8 / 9)


def coin_lines(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"p{i}{rng.choice('ab')}" for i in range(8)) for _ in range(count)]


def test_validation_perplexity_approaches_the_true_perplexity(tmp_path):
    folder = write_corpus(
        tmp_path / "coins",
        {"train": coin_lines(2000, 0), "valid": coin_lines(300, 1), "test": coin_lines(300, 2)},
    )
    L.seed_everything(0)
    datamodule = PTBDataModule(
        dir=folder, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=8, num_steps=10
    )
    model = language_model(datamodule.vocab_size, hidden_size=32, init_scale=0.1, lr=1.0, decay_after=2)
    trainer = quiet_trainer(max_epochs=3, gradient_clip_val=5)
    trainer.fit(model, datamodule=datamodule)  # 3 x 224 steps
    val_ppl = trainer.callback_metrics["val/ppl"].item()
    assert TRUE_PERPLEXITY * 0.97 < val_ppl < TRUE_PERPLEXITY * 1.05, val_ppl
