"""docs/design.md, "Model and training" and "Perplexity": state carry, loss scale, schedule, exact ppl."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lm.data.datamodule import PTBDataModule
from lm.training.metrics import Perplexity
from tests.conftest import language_model, quiet_trainer


def tiny_setup(corpus_dir, tmp_path, **data):
    datamodule = PTBDataModule(dir=corpus_dir, cache_dir=tmp_path / "cache", url="file:///nowhere", **data)
    model = language_model(datamodule.vocab_size, hidden_size=8, init_scale=0.3)
    return datamodule, model


def test_loss_is_summed_over_time_and_averaged_over_streams(tiny_corpus, tmp_path):
    datamodule, model = tiny_setup(tiny_corpus, tmp_path, batch_size=4, num_steps=10)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    logits, _ = model.net(x)
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)) * 10
    model.trainer = quiet_trainer()  # step 0 of 50 between logs, window 1: nothing to log outside a fit
    assert torch.allclose(model.training_step((x, y), 1), expected)


def test_awd_loss_is_the_mean_per_target_plus_activation_regularisation(tiny_corpus, tmp_path):
    datamodule, _ = tiny_setup(tiny_corpus, tmp_path, batch_size=4, num_steps=10)
    model = language_model(datamodule.vocab_size, hidden_size=8, loss_average="tokens", ar=2.0, tar=1.0)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    out, _ = model.net.features(x)
    logits = model.net.decoder(out)
    ar, tar = out.pow(2).mean(), (out[:, 1:] - out[:, :-1]).pow(2).mean()
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)) + 2 * ar + tar
    model.trainer = quiet_trainer()
    assert torch.allclose(model.training_step((x, y), 1), expected)


def test_test_perplexity_equals_a_token_by_token_batch_1_loop(tiny_corpus, tmp_path):
    datamodule, model = tiny_setup(tiny_corpus, tmp_path, test_num_steps=37)
    (result,) = quiet_trainer().test(model, datamodule=datamodule, verbose=False)

    ids = datamodule.corpus.splits["test"].long()
    model.eval()
    total_nll, state = 0.0, None
    with torch.no_grad():
        for t in range(len(ids) - 1):
            logits, state = model.net(ids[t].view(1, 1), state)
            total_nll -= F.log_softmax(logits.view(-1), dim=0)[ids[t + 1]].item()
    assert result["test/ppl"] == pytest.approx(math.exp(total_nll / (len(ids) - 1)), rel=1e-5)


def test_learning_rate_decays_once_per_epoch_after_decay_after(tiny_corpus, tmp_path):
    datamodule, _ = tiny_setup(tiny_corpus, tmp_path, batch_size=4, num_steps=10)
    model = language_model(datamodule.vocab_size, hidden_size=8, lr=1.0, lr_decay=0.5, decay_after=3)
    rates = []  # (epoch, lr) of every step, as the optimiser takes it

    class RecordLearningRate(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            rates.append((trainer.current_epoch, optimizer.param_groups[0]["lr"]))

    quiet_trainer(
        max_epochs=6, limit_train_batches=3, limit_val_batches=1, callbacks=[RecordLearningRate()]
    ).fit(model, datamodule=datamodule)
    expected = [0.5 ** max(epoch + 1 - 3, 0) for epoch in range(6)]  # 1, 1, 1, 0.5, 0.25, 0.125
    assert rates == [(epoch, lr) for epoch, lr in enumerate(expected) for _ in range(3)]


def test_perplexity_weighs_every_target_not_every_window():
    ppl = Perplexity()
    ppl.update(torch.tensor(2.0 * 30), 30)  # a full window of 30 targets with mean NLL 2
    ppl.update(torch.tensor(5.0 * 3), 3)  # a last, short window of 3 targets with mean NLL 5
    assert ppl.compute().item() == pytest.approx(math.exp((60 + 15) / 33))


def test_epoch_train_perplexity_is_exact_over_the_epochs_windows(tiny_corpus, tmp_path):
    datamodule, _ = tiny_setup(tiny_corpus, tmp_path, batch_size=4, num_steps=10)
    model = language_model(datamodule.vocab_size, hidden_size=8, init_scale=0.3, lr=0.0)  # weights stay put
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)

    total_nll, targets, state = 0.0, 0, None
    with torch.no_grad():
        for x, y in datamodule.train_dataloader():
            logits, state = model.net(x, state)
            total_nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            targets += y.numel()
    assert trainer.callback_metrics["train/epoch_ppl"].item() == pytest.approx(
        math.exp(total_nll / targets), rel=1e-6
    )
