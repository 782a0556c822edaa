"""Every network of lm/models keeps the contract (lm/models/network.py): its state carries a stream
exactly across windows of any length, its gradients are right, and training and evaluation start
each epoch and each pass from a zero state."""

from itertools import pairwise

import pytest
import torch
from torch.func import functional_call

from lm.data.datamodule import PTBDataModule
from lm.evaluation.scoring import score_stream
from lm.models.network import build_network
from lm.training.module import LanguageModel
from tests.conftest import quiet_trainer

# A tiny instance of each network, every part of it on (dropout aside, which evaluation turns off).
TINY = {
    "lstm": {"_target_": "lm.models.lstm.LSTMOptions", "hidden_size": 6, "num_layers": 2},
    "mogrifier": {
        "_target_": "lm.models.mogrifier.MogrifierOptions",
        "hidden_size": 6,
        "embedding_size": 4,
        "tie_weights": True,
        "num_layers": 2,
        "rounds": 5,
        "rank": 2,
    },
    "xlstm": {
        "_target_": "lm.models.xlstm.XLSTMOptions",
        "embedding_size": 8,
        "num_blocks": 2,
        "slstm_at": [1],
        "num_heads": 2,
        "conv_kernel": 3,
        "chunk_size": 5,
    },
}
VOCAB = 11


@pytest.mark.parametrize("name", TINY)
def test_scoring_in_windows_of_any_length_gives_the_whole_streams_log_probabilities(name):
    torch.manual_seed(0)
    net = build_network(TINY[name], VOCAB).double()
    ids = torch.randint(0, VOCAB, (301,))
    whole = score_stream(net, ids, torch.device("cpu"), chunk_length=len(ids)).log_probs
    for length in (1, 7, 200):
        pieces = score_stream(net, ids, torch.device("cpu"), chunk_length=length).log_probs
        torch.testing.assert_close(pieces, whole, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_the_gradients_are_the_finite_differences_of_the_loss(name):
    torch.manual_seed(0)
    net = build_network(TINY[name], VOCAB).double().eval()
    x, y = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9))
    _, state = net.features(torch.randint(0, VOCAB, (2, 4)))  # a carried state, not zeros
    names = [n for n, _ in net.named_parameters()]

    def loss(*parameters: torch.Tensor) -> torch.Tensor:
        logits, _ = functional_call(net, dict(zip(names, parameters, strict=True)), (x, state))
        return torch.log_softmax(logits, -1).gather(2, y[..., None]).sum()

    parameters = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    assert torch.autograd.gradcheck(loss, parameters, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("name", TINY)
def test_state_is_carried_detached_reset_each_epoch_and_kept_from_validation(name, tiny_corpus, tmp_path):
    datamodule = PTBDataModule(
        dir=tiny_corpus, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=4, num_steps=10
    )
    model = LanguageModel(datamodule.vocab_size, TINY[name], loss_average="tokens")
    calls = []  # (training?, state in, state out)
    hidden = model.net.features  # what training and evaluation both call

    def recording_hidden(x, state=None):
        out, new_state = hidden(x, state)
        calls.append((model.training, state, new_state))
        return out, new_state

    model.net.features = recording_hidden
    quiet_trainer(max_epochs=2, limit_train_batches=6, limit_val_batches=2, val_check_interval=3).fit(
        model, datamodule=datamodule
    )

    training = [(state_in, state_out) for is_training, state_in, state_out in calls if is_training]
    validation = [(state_in, state_out) for is_training, state_in, state_out in calls if not is_training]
    assert len(training) == 12 and len(validation) == 8  # validation after steps 3 and 6 of 2 epochs
    for epoch in (training[:6], training[6:]):
        assert epoch[0][0] is None  # zero state at every epoch start
        for (_, out), (state_in, _) in pairwise(epoch):
            state_in, out = tensors(state_in), tensors(out)
            assert all(torch.equal(s_in, s_out) for s_in, s_out in zip(state_in, out, strict=True))
            assert all(s.grad_fn is None and not s.requires_grad for s in state_in)  # truncated
    # Each validation pass starts from zeros and never hands its state to training.
    assert [state_in is None for state_in, _ in validation] == [True, False] * 4


def tensors(state):
    return [s for layer in state for s in layer]
