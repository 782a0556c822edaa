"""design.md, "Model and training" and "Perplexity": state carry, loss scale, schedule, exact ppl."""

import math
from itertools import pairwise

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lm.data import PTBDataModule
from lm.module import LanguageModel


def tiny_setup(corpus_dir, tmp_path, **data):
    datamodule = PTBDataModule(dir=corpus_dir, cache_dir=tmp_path / "cache", url="file:///nowhere", **data)
    model = LanguageModel(datamodule.vocab_size, hidden_size=8, init_scale=0.3)
    return datamodule, model


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_state_is_carried_detached_reset_each_epoch_and_kept_from_validation(tiny_corpus, tmp_path):
    datamodule, model = tiny_setup(tiny_corpus, tmp_path, batch_size=4, num_steps=10)
    calls = []  # (training?, state in, state out)
    forward = model.net.forward

    def recording_forward(x, state=None):
        logits, new_state = forward(x, state)
        calls.append((model.training, state, new_state))
        return logits, new_state

    model.net.forward = recording_forward
    quiet_trainer(max_epochs=2, limit_train_batches=6, limit_val_batches=2, val_check_interval=3).fit(
        model, datamodule=datamodule
    )

    training = [(state_in, state_out) for is_training, state_in, state_out in calls if is_training]
    validation = [(state_in, state_out) for is_training, state_in, state_out in calls if not is_training]
    assert len(training) == 12 and len(validation) == 8  # validation after steps 3 and 6 of 2 epochs
    for epoch in (training[:6], training[6:]):
        assert epoch[0][0] is None  # zero state at every epoch start
        for (_, out), (state_in, _) in pairwise(epoch):
            assert all(torch.equal(s_in, s_out) for s_in, s_out in zip(state_in, out, strict=True))
            assert all(s.grad_fn is None and not s.requires_grad for s in state_in)  # truncated
    # Each validation pass starts from zeros and never hands its state to training.
    assert [state_in is None for state_in, _ in validation] == [True, False] * 4


def test_loss_is_summed_over_time_and_averaged_over_streams(tiny_corpus, tmp_path):
    datamodule, model = tiny_setup(tiny_corpus, tmp_path, batch_size=4, num_steps=10)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    logits, _ = model.net(x)
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)) * 10
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer here to log to
        assert torch.allclose(model.training_step((x, y), 0), expected)


def test_test_perplexity_equals_a_token_by_token_batch_1_loop(tiny_corpus, tmp_path):
    datamodule, model = tiny_setup(tiny_corpus, tmp_path, test_num_steps=37)
    (result,) = quiet_trainer().test(model, datamodule=datamodule, verbose=False)

    ids = datamodule.corpus.splits["test"]
    model.eval()
    total_nll, state = 0.0, None
    with torch.no_grad():
        for t in range(len(ids) - 1):
            logits, state = model.net(ids[t].view(1, 1), state)
            total_nll -= F.log_softmax(logits.view(-1), dim=0)[ids[t + 1]].item()
    assert result["test/ppl"] == pytest.approx(math.exp(total_nll / (len(ids) - 1)), rel=1e-5)


@pytest.mark.parametrize(("lr_decay", "decay_after"), [(0.5, 4), (1 / 1.2, 6), (1 / 1.15, 14)])
def test_learning_rate_decays_per_epoch_after_decay_after(lr_decay, decay_after):
    model = LanguageModel(vocab_size=5, hidden_size=4, lr=1.0, lr_decay=lr_decay, decay_after=decay_after)
    schedule = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(20):
        rates.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    assert rates == pytest.approx([lr_decay ** max(e + 1 - decay_after, 0) for e in range(20)])
    assert rates[decay_after - 1] == 1.0 and rates[decay_after] == pytest.approx(lr_decay)
