"""The Mogrifier LSTM (lm/models/mogrifier.py): its rounds as the paper writes them, the LSTM network
it becomes with none, its low-rank maps, its options and its presets."""

import dataclasses

import pytest
import torch
from conftest import compose_config

from lm.models.lstm import LSTMNetwork, LSTMOptions
from lm.models.mogrifier import MogrifierLayer, MogrifierNetwork, MogrifierOptions
from lm.models.network import build_network, network_problems

AWD_DROPOUTS = {
    "input_dropout": 0.3,
    "hidden_dropout": 0.2,
    "output_dropout": 0.4,
    "embedding_dropout": 0.1,
    "weight_drop": 0.5,
    "dropout": 0.1,
}


def mogrifier_names(lstm: LSTMNetwork) -> dict[str, str]:
    """The LSTM network's names of its layers' weights, in one nn.LSTM or one per layer, and the
    Mogrifier's names for them."""
    names, layer = {}, 0
    for i, rnn in enumerate(lstm.rnns):
        for k in range(rnn.num_layers):
            for weight in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                names[f"rnns.{i}.{weight}_l{k}"] = f"rnns.{layer}.cell.{weight}"
            layer += 1
    return names


def per_layer(state: list[tuple[torch.Tensor, ...]] | None) -> list[tuple[torch.Tensor, ...]] | None:
    """A state with one (h, c) per layer: a multi-layer nn.LSTM's holds its layers along dimension 0."""
    if state is None:
        return None
    return [tuple(t[k : k + 1] for t in layer) for layer in state for k in range(layer[0].size(0))]


@pytest.mark.parametrize(
    "options",
    [
        {},  # one two-layer nn.LSTM, from a carried state
        {"embedding_size": 6, "tie_weights": True, "num_layers": 3, **AWD_DROPOUTS},  # an nn.LSTM per layer
    ],
)
def test_no_rounds_is_the_lstm_network_in_training_and_evaluation(options):
    torch.manual_seed(0)
    lstm = LSTMOptions(hidden_size=10, init="awd", **options).network(40).double()
    mogrifier = MogrifierOptions(**dataclasses.asdict(lstm.options), rounds=0).network(40).double()
    names = mogrifier_names(lstm)
    mogrifier.load_state_dict({names.get(key, key): value for key, value in lstm.state_dict().items()})
    x = torch.randint(40, (3, 9))
    state = None if options else [tuple(torch.randn(2, 2, 3, 10, dtype=torch.float64))]
    for training in (False, True):  # with the same seed, training draws the same dropout masks
        results = []
        for net, carried in ((lstm, state), (mogrifier, per_layer(state))):
            net.train(training)
            net.zero_grad()
            torch.manual_seed(1)
            features, new_state = net.features(x, carried)
            net.target_log_probs(net.drop_output(features), x).sum().backward()
            grads = {names.get(name, name): parameter.grad for name, parameter in net.named_parameters()}
            results.append((features, per_layer(new_state), grads))
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 3])
def test_one_step_gates_x_by_h_then_h_by_x_alternately_then_steps_the_lstm(rank):
    torch.manual_seed(0)
    layer = MogrifierLayer(input_size=5, hidden_size=7, rounds=5, rank=rank).double()
    for parameter in layer.parameters():  # larger than the default, so that each round matters
        torch.nn.init.uniform_(parameter, -1, 1)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    h, c = torch.randn(2, 7, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)

    def matrix(j):  # round j's Q or R, the product of its factors when low-rank
        factors = [linear.weight for linear in layer.rounds[j - 1]]
        return factors[0] if rank is None else factors[1] @ factors[0]

    x1 = 2 * torch.sigmoid(h @ matrix(1).T) * x[:, 0]
    h2 = 2 * torch.sigmoid(x1 @ matrix(2).T) * h
    x3 = 2 * torch.sigmoid(h2 @ matrix(3).T) * x1
    h4 = 2 * torch.sigmoid(x3 @ matrix(4).T) * h2
    x5 = 2 * torch.sigmoid(h4 @ matrix(5).T) * x3
    cell = layer.cell
    gates = x5 @ cell.weight_ih.T + cell.bias_ih + h4 @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)

    out, (h_out, c_out) = layer(x[:, :1], (h.unsqueeze(0), c.unsqueeze(0)))
    torch.testing.assert_close(out[:, 0], h_next, rtol=0, atol=1e-12)
    torch.testing.assert_close((h_out, c_out), (h_next.unsqueeze(0), c_next.unsqueeze(0)), rtol=0, atol=1e-12)
    assert not torch.allclose(x1, x[:, 0]) and not torch.allclose(h2, h)  # the rounds did gate
    with torch.no_grad():  # evaluation's path
        assert torch.equal(layer(x[:, :1], (h.unsqueeze(0), c.unsqueeze(0)))[0], out)


@pytest.mark.parametrize("rank", [None, 2])
def test_the_weights_gradients_taken_once_per_window_are_the_true_ones(rank):
    torch.manual_seed(0)
    layer = MogrifierLayer(input_size=3, hidden_size=4, rounds=5, rank=rank).double()
    names = [name for name, _ in layer.named_parameters()]

    def run(x, h, c, weight_hh, *parameters):  # weight_hh: DropConnect's masked copy, in the cell's place
        out, (h, c) = torch.func.functional_call(
            layer, dict(zip(names, parameters, strict=True)), (x, (h, c), weight_hh)
        )
        return out, h, c

    def new(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    parameters = [parameter.detach().clone().requires_grad_() for parameter in layer.parameters()]
    assert torch.autograd.gradcheck(run, (new(2, 3, 3), new(1, 2, 4), new(1, 2, 4), new(16, 4), *parameters))


def test_low_rank_maps_are_two_thin_factors_with_the_counts_they_imply():
    embedding, hidden, rounds, rank, vocab = 20, 30, 5, 4, 50
    full = MogrifierNetwork(
        vocab, MogrifierOptions(hidden_size=hidden, embedding_size=embedding, rounds=rounds)
    )
    low = MogrifierNetwork(
        vocab, MogrifierOptions(hidden_size=hidden, embedding_size=embedding, rounds=rounds, rank=rank)
    )
    lstm = LSTMNetwork(vocab, LSTMOptions(hidden_size=hidden, embedding_size=embedding))
    first = low.rnns[0]  # from the 20-unit embedding to 30 units
    shapes = [[tuple(linear.weight.shape) for linear in round_] for round_ in first.rounds]
    # Q_j = (20 x 4)(4 x 30), applied to h: the (4 x 30) factor first; R_j = (30 x 4)(4 x 20).
    assert shapes == [[(4, 30), (20, 4)], [(4, 20), (30, 4)]] * 2 + [[(4, 30), (20, 4)]]
    assert [tuple(linear.weight.shape) for linear in full.rnns[1].rounds[0]] == [(30, 30)]

    def count(net):
        return sum(parameter.numel() for parameter in net.parameters())

    assert count(low) - count(lstm) == rounds * rank * (20 + 30) + rounds * rank * (30 + 30)
    assert count(full) - count(lstm) == rounds * 20 * 30 + rounds * 30 * 30


def test_options_refuse_a_rank_no_map_can_have_and_keep_the_lstms_refusals():
    def lines(**values):
        return network_problems(
            {"_target_": "lm.models.mogrifier.MogrifierOptions", **values}, vocab_size=100
        )

    assert lines(hidden_size=30, embedding_size=20, rank=20) == []  # a full-rank factorisation: allowed
    assert lines(hidden_size=30, embedding_size=20, rank=0) == lines(rank=None) == []  # full rank
    assert lines(hidden_size=30, embedding_size=20, rank=21, rounds=0) == []  # no map: nothing to refuse
    # One tied layer of embedding_size units: its maps are 40 x 40, whatever hidden_size says.
    assert lines(hidden_size=10, embedding_size=40, num_layers=1, tie_weights=True, rank=40) == []
    assert lines(hidden_size=30, embedding_size=20, rank=21) == [
        "model.net.rank=21 is not allowed: it must be null or 0 (full rank), or at most 20: a map from or "
        "to 20 units has no higher rank."
    ]
    assert lines(rounds=-1) == ["model.net.rounds=-1 is not allowed: it must be an integer, 0 or more."]
    assert lines(cutoffs=[10]) == [  # the LSTM's own
        "model.net.cutoffs=[10] is not allowed: it must be null with model.net.softmax=full; set "
        "model.net.softmax=adaptive to use them."
    ]


@pytest.mark.parametrize("preset", ["mogrifier_cpu", "mogrifier"])
def test_the_presets_compose_and_build_a_mogrifier_network(preset):
    cfg = compose_config(f"model={preset}")
    assert cfg.model.net._target_ == "lm.models.mogrifier.MogrifierOptions"
    assert network_problems(cfg.model.net, vocab_size=10000) == []
    assert cfg.model.net.rounds > 0
    if preset == "mogrifier":  # the paper's PTB model: 24M parameters
        net = build_network(cfg.model.net, vocab_size=10000)
        assert 23.5e6 < sum(parameter.numel() for parameter in net.parameters()) <= 24e6
    defaults = compose_config("model/net=mogrifier").model.net
    assert (defaults.rounds, defaults.rank, defaults.hidden_size) == (5, None, 200)
