"""Speed-ups change how fast the numbers come, never the numbers (same seed)."""

import sys

import lightning as L
import pytest
from lm.allocator import keep_freed_memory
from lm.data.datamodule import PTBDataModule
from lm.training.metrics import summed_nll
from lm.training.module import LanguageModel
from tests.conftest import quiet_trainer


def validation_perplexity(corpus, tmp_path, **model_options) -> float:
    L.seed_everything(3)
    datamodule = PTBDataModule(dir=corpus, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=4)
    model = LanguageModel(datamodule.vocab_size, hidden_size=16, dropout=0.2, **model_options)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=40, gradient_clip_val=5)
    trainer.fit(model, datamodule=datamodule)
    return trainer.callback_metrics["val/ppl"].item()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keeping_freed_memory_leaves_the_numbers_bit_identical(tiny_corpus, tmp_path):
    before = validation_perplexity(tiny_corpus, tmp_path)
    assert keep_freed_memory()
    assert validation_perplexity(tiny_corpus, tmp_path) == before


def test_compiled_loss_gives_the_same_perplexity(tiny_corpus, tmp_path):
    eager = validation_perplexity(tiny_corpus, tmp_path)
    compiled = validation_perplexity(tiny_corpus, tmp_path, compile=True)
    model = LanguageModel(vocab_size=12, compile=True)
    model.setup("fit")
    assert model.summed_nll is not summed_nll  # the compiled one is in use
    assert compiled == pytest.approx(eager, rel=1e-5)
