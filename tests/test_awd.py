"""AWD-LSTM's regularisers, variable windows and NT-ASGD (Merity et al. 2017)."""

import dataclasses
import math
import warnings

import lightning as L
import pytest
import torch
from conftest import compose_config, language_model, quiet_trainer, write_corpus, write_tiny_corpus
from torch import nn

from lm.data.datamodule import PTBDataModule
from lm.data.windows import WindowDataset, batchify, variable_lengths
from lm.evaluation.generation import sample
from lm.evaluation.loading import load_model
from lm.evaluation.scoring import score_stream
from lm.models.dropout import embedding_dropout, locked_dropout
from lm.models.lstm import LSTMNetwork, LSTMOptions
from lm.training.module import LanguageModel
from lm.training.safe_stop import TrainingCheckpoint


def test_the_awd_preset_sets_the_paper_values_and_the_zaremba_presets_keep_them_off():
    awd = compose_config("model=awd")
    assert (awd.model.net.embedding_size, awd.model.net.hidden_size, awd.model.net.num_layers) == (
        400,
        1150,
        3,
    )
    dropouts = [
        awd.model.net[key]
        for key in ("input_dropout", "hidden_dropout", "output_dropout", "embedding_dropout")
    ]
    assert dropouts == [0.4, 0.25, 0.4, 0.1] and awd.model.net.weight_drop == 0.5
    assert (awd.model.ar, awd.model.tar, awd.model.weight_decay, awd.model.lr) == (2, 1, 1.2e-6, 30)
    assert awd.model.asgd_nonmono == 5 and awd.model.loss_average == "tokens" and awd.model.net.init == "awd"
    assert (awd.data.batch_size, awd.data.num_steps, awd.data.vary_num_steps) == (20, 70, True)
    assert (awd.trainer.max_epochs, awd.trainer.gradient_clip_val) == (500, 0.25)
    for preset in ("small", "medium", "large"):
        model = compose_config(f"model={preset}").model
        assert not any(model.net[key] for key in ("weight_drop", "input_dropout"))
        assert not any(model[key] for key in ("ar", "tar", "weight_decay"))
        assert model.loss_average == "streams" and model.net.init == "uniform" and model.asgd_nonmono is None


def test_locked_dropout_keeps_one_mask_across_time():
    x = torch.ones(6, 30, 40)
    torch.manual_seed(0)
    out = locked_dropout(x, 0.5, training=True)
    assert torch.equal(out, out[:, :1].expand_as(out))  # every step of a sequence: the same mask
    assert set(out.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1 / (1 - p)
    assert 0.35 < (out == 0).float().mean() < 0.65
    assert not torch.equal(out[0], out[1])  # a mask per sequence
    assert torch.equal(locked_dropout(x, 0.5, training=False), x)


def test_embedding_dropout_drops_whole_words_consistently():
    embedding = nn.Embedding(20, 8)
    x = torch.tensor([[1, 2, 1, 3, 5], [2, 1, 4, 1, 5]])
    torch.manual_seed(3)
    out = embedding_dropout(embedding, x, 0.5, training=True)
    dropped = set()
    for word in x.unique().tolist():
        rows = out[x == word]
        if rows.abs().sum() == 0:
            dropped.add(word)
        else:  # kept everywhere it occurs, scaled by 1 / (1 - p)
            assert torch.allclose(rows, embedding.weight[word].expand_as(rows) * 2)
    assert 0 < len(dropped) < len(x.unique())
    assert torch.equal(embedding_dropout(embedding, x, 0.5, training=False), embedding(x))


def test_weight_drop_changes_recurrent_weights_in_training_only_and_gradients_reach_them():
    torch.manual_seed(0)
    net = LSTMNetwork(50, LSTMOptions(hidden_size=16, weight_drop=0.5))
    x = torch.randint(50, (3, 7))
    raw = [p.detach().clone() for p in net.parameters()]

    net.eval()
    plain, _ = net(x)
    net.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a word from PyTorch about the weights
        first, _ = net(x)
        second, _ = net(x)
    assert not torch.allclose(first, plain) and not torch.allclose(first, second)  # a new mask each call
    first.pow(2).sum().backward()
    for rnn in net.rnns:
        assert rnn.weight_hh_l0.grad is not None and rnn.weight_hh_l0.grad.count_nonzero() > 0
    assert all(torch.equal(p, r) for p, r in zip(net.parameters(), raw, strict=True))  # never masked in place

    net.eval()
    again, _ = net(x)
    assert torch.equal(again, plain)  # evaluation: the raw weights
    net.train()
    net.options = dataclasses.replace(net.options, weight_drop=1e-12)  # a mask that keeps everything:
    # the masked path computes what nn.LSTM does
    nearly, _ = net(x)
    assert torch.allclose(nearly, plain, atol=1e-6)


def test_zaremba_options_keep_one_multi_layer_lstm():
    net = LSTMNetwork(50, LSTMOptions(hidden_size=16, dropout=0.3))
    assert len(net.rnns) == 1 and net.rnns[0].num_layers == 2 and net.rnns[0].dropout == 0.3


def test_tied_weights_with_a_smaller_embedding_give_the_last_layer_its_size():
    net = LSTMNetwork(50, LSTMOptions(hidden_size=32, num_layers=3, tie_weights=True, embedding_size=8))
    assert [rnn.hidden_size for rnn in net.rnns] == [32, 32, 8]
    assert net.decoder.weight is net.embedding.weight
    logits, state = net(torch.randint(50, (2, 5)))
    assert logits.shape == (2, 5, 50) and [h.size(-1) for h, _ in state] == [32, 32, 8]


def test_one_tied_layer_has_the_embedding_size_and_runs_as_one_nn_lstm_or_per_layer_alike():
    # AWD-LSTM's last layer outputs embedding_size when tied; with one layer, that is the only one.
    options = LSTMOptions(hidden_size=32, num_layers=1, tie_weights=True, embedding_size=8)
    fused = LSTMNetwork(50, options)
    per_layer = LSTMNetwork(50, dataclasses.replace(options, hidden_dropout=0.5))  # no effect with one layer
    assert (
        [(rnn.input_size, rnn.hidden_size) for rnn in fused.rnns]
        == [(8, 8)]
        == [(rnn.input_size, rnn.hidden_size) for rnn in per_layer.rnns]
    )
    per_layer.load_state_dict(fused.state_dict())
    x = torch.randint(50, (3, 7))
    (logits, state), (again, again_state) = fused.eval()(x), per_layer.eval()(x)
    assert torch.equal(logits, again) and all(map(torch.equal, state[0], again_state[0]))


def test_a_model_of_one_tied_layer_trains_scores_and_generates(tmp_path):
    torch.manual_seed(0)
    lines = ["the cat sat on the mat", "a dog ate a big red bone"]  # a text there is to learn
    corpus = write_corpus(
        tmp_path / "corpus", {"train": lines * 150, "valid": lines * 20, "test": lines * 20}
    )
    datamodule = PTBDataModule(str(corpus), str(tmp_path / "cache"), batch_size=4, num_steps=20)
    model = language_model(
        datamodule.vocab_size, hidden_size=32, num_layers=1, tie_weights=True, embedding_size=8
    )
    trainer = quiet_trainer(max_epochs=2, gradient_clip_val=5)  # Zaremba's clip
    (untrained,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    trainer.fit(model, datamodule=datamodule)
    (trained,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    assert trained["val/ppl"] < untrained["val/ppl"] / 4  # about 13 -> 1.2
    (tested,) = trainer.test(model, datamodule=datamodule, verbose=False)

    trainer.save_checkpoint(tmp_path / "one-layer.ckpt", weights_only=True)
    loaded = load_model(str(tmp_path / "one-layer.ckpt"))
    test_ids = datamodule.corpus.splits["test"].long()
    scores = score_stream(loaded.net, test_ids, torch.device("cpu"), chunk_length=50)
    assert scores.perplexity() == pytest.approx(tested["test/ppl"], rel=1e-5)
    words = sample(loaded.net, test_ids[:3], num_words=5, num_samples=2, generator=torch.Generator())
    assert words.shape == (2, 5) and int(words.max()) < datamodule.vocab_size


def test_variable_windows_follow_the_rule_and_cover_the_stream_continuously():
    lengths = variable_lengths(10_000, 70, torch.Generator().manual_seed(1))
    assert sum(lengths) == 10_000
    assert all(5 <= n <= 90 for n in lengths[:-1])
    assert 60 < sum(lengths[:-1]) / len(lengths[:-1]) < 72  # mostly about 70, now and then about 35
    assert any(n < 50 for n in lengths)
    assert lengths == variable_lengths(10_000, 70, torch.Generator().manual_seed(1))
    assert lengths != variable_lengths(10_000, 70, torch.Generator().manual_seed(2))

    streams = batchify(torch.arange(3 * 400), 3)
    lengths = variable_lengths(streams.size(1) - 1, 20, torch.Generator().manual_seed(0))
    windows = list(WindowDataset(streams, 20, True, lengths))
    assert [x.size(1) for x, _ in windows] == lengths
    assert torch.equal(torch.cat([x for x, _ in windows], 1), streams[:, :-1])
    assert torch.equal(torch.cat([y for _, y in windows], 1), streams[:, 1:])


class Recorder(L.Callback):
    """Each training window's length and the lr it was trained with, by epoch."""

    def __init__(self):
        self.windows: dict[int, list[tuple[int, float]]] = {}
        self.logged_lr: dict[int, list[float]] = {}  # the "lr" the module logged at each step
        self.validated: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.length = batch[0].size(1)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        lr = optimizer.param_groups[0]["lr"]
        self.windows.setdefault(trainer.current_epoch, []).append((self.length, lr))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.logged_lr.setdefault(trainer.current_epoch, []).append(float(trainer.callback_metrics["lr"]))

    def on_validation_epoch_end(self, trainer, module):
        self.validated.append(trainer.current_epoch)


def test_training_with_variable_windows_scales_lr_and_validates_every_epoch(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus", train_lines=600)
    datamodule = PTBDataModule(
        str(corpus), str(tmp_path / "cache"), batch_size=4, num_steps=20, vary_num_steps=True, seed=7
    )
    model = language_model(datamodule.vocab_size, hidden_size=8, lr=2.0, lr_decay=0.5, decay_after=1)
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=datamodule)
    assert recorder.validated == [0, 1, 2]  # Lightning saw each epoch's true number of windows
    targets = datamodule.streams["train"].size(1) - 1
    for epoch, windows in recorder.windows.items():
        assert sum(n for n, _ in windows) == targets  # the whole stream, once
        for n, lr in windows:
            assert lr == pytest.approx(2.0 * 0.5**epoch * n / 20)
        assert recorder.logged_lr[epoch] == pytest.approx([lr for _, lr in windows])  # this window's lr
    assert recorder.windows[0] != recorder.windows[1]  # new windows each epoch


def test_nt_asgd_switches_when_validation_stops_improving_and_checkpoints_the_average(tmp_path):
    torch.manual_seed(0)  # the premise below holds from this start (not from all: seeds 2 and 3 fit less)
    # Training teaches "a b c d"; validation reads "a c b d": the better the fit, the worse validation.
    corpus = write_corpus(
        tmp_path / "corpus",
        {"train": ["a b c d"] * 300, "valid": ["a c b d"] * 40, "test": ["a c b d"] * 40},
    )
    datamodule = PTBDataModule(str(corpus), str(tmp_path / "cache"), batch_size=4, num_steps=10)
    model = language_model(datamodule.vocab_size, hidden_size=8, lr=1.0, lr_decay=1.0, asgd_nonmono=1)

    raw_weights = []  # the network's weights after every step since the switch

    class RecordRawWeights(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if module.averaging.average is not None:
                raw_weights.append({k: v.clone() for k, v in module.net.state_dict().items()})

    def trainer(epochs):
        return L.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            callbacks=[RecordRawWeights(), TrainingCheckpoint(tmp_path / "checkpoints")],
        )

    trainer(4).fit(model, datamodule=datamodule)
    losses = model.averaging.val_losses
    assert losses[1] > losses[0] and losses[2] > losses[0]  # the premise: validation gets worse
    assert model.averaging.since == 2  # the first epoch no better than the one before last
    assert isinstance(model.trainer.optimizers[0], torch.optim.SGD)  # the steps stay SGD's
    windows = len(datamodule.train_dataloader())
    assert len(raw_weights) == windows  # epoch 3's steps, after epoch 2's validation switched
    mean = {k: torch.stack([w[k] for w in raw_weights]).mean(0) for k in raw_weights[0]}
    for name, value in model.averaging.average.module.state_dict().items():
        torch.testing.assert_close(value, mean[name], rtol=1e-5, atol=1e-6)

    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["asgd"] == {"val_losses": losses, "averaging_since": 2}
    weights, raw = checkpoint["state_dict"], checkpoint["training_state_dict"]
    for name, value in model.averaging.average.module.state_dict().items():
        assert torch.equal(weights[f"net.{name}"], value)  # the model saved is the average
        assert torch.equal(raw[f"net.{name}"], raw_weights[-1][name])  # training goes on from the raw ones
    # Validation used the average: the last epoch's validation loss is the averaged weights'.
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(loaded.net.embedding.weight, weights["net.embedding.weight"])
    (result,) = quiet_trainer(limit_test_batches=None).test(
        loaded, dataloaders=datamodule.val_dataloader(), verbose=False
    )
    assert math.log(result["test/ppl"]) == pytest.approx(losses[-1], rel=1e-6)

    resumed = language_model(datamodule.vocab_size, hidden_size=8, lr=1.0, lr_decay=1.0, asgd_nonmono=1)
    trainer(5).fit(
        resumed, datamodule=datamodule, ckpt_path=tmp_path / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert resumed.averaging.since == 2
    assert int(resumed.averaging.average.n_averaged) == 2 * windows  # the average went on, not restarted
    assert len(raw_weights) == 2 * windows
    mean = {k: torch.stack([w[k] for w in raw_weights]).mean(0) for k in raw_weights[0]}
    for name, value in resumed.averaging.average.module.state_dict().items():
        torch.testing.assert_close(value, mean[name], rtol=1e-5, atol=1e-6)
