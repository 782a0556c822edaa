"""lm/models/xlstm.py: the cells are the paper's equations, the mLSTM's three forms are one function,
the stabiliser never changes an output, and the options refuse what cannot be built."""

import pytest
import torch
import torch.nn.functional as F

from lm.errors import UserError
from lm.models.network import build_network, network_problems
from lm.models.xlstm_cells import mlstm_chunkwise, mlstm_parallel, mlstm_step, slstm_steps
from tests.conftest import compose_config

XLSTM = "lm.models.xlstm.XLSTMOptions"


def mlstm_inputs(steps: int, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v (batch 2, heads 3, steps, 4 or 5), the input gate and the log forget gate, float64."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = draw(2, 3, steps, 4), draw(2, 3, steps, 4), draw(2, 3, steps, 5)
    return q, k, v, scale * draw(2, 3, steps), F.logsigmoid(scale * draw(2, 3, steps))


def test_the_mlstm_is_the_papers_recurrence_without_a_stabiliser():
    """C_t = f C + i k v^T, n_t = f n + i k, h = C^T q / max(|n . q|, 1), with i = exp(i~), in float64
    at gates that keep exp() in range: the stabilised forms must give exactly this."""
    q, k, v, i, log_f = mlstm_inputs(12, scale=1.0)
    C, n = torch.zeros(2, 3, 4, 5, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64)
    expected = []
    for t in range(12):
        f, write = log_f[..., t].exp()[..., None], i[..., t].exp()[..., None]
        C = f[..., None] * C + write[..., None] * k[..., t, :, None] * v[..., t, None, :]
        n = f * n + write * k[..., t, :]
        denominator = (n * q[..., t, :]).sum(-1).abs().clamp(min=1)
        expected.append(torch.einsum("bhk,bhkv->bhv", q[..., t, :], C) / denominator[..., None])
    for form in (mlstm_step, mlstm_parallel, lambda *inputs: mlstm_chunkwise(*inputs, chunk_size=5)):
        torch.testing.assert_close(
            form(q, k, v, i, log_f)[0], torch.stack(expected, 2), rtol=1e-9, atol=1e-12
        )


def test_the_slstm_is_the_papers_recurrence_without_a_stabiliser():
    """c = f c + i z, n = f n + i, h = o c / n, with i = exp(i~), f = sigmoid(f~), z = tanh(z~),
    o = sigmoid(o~), and each head's previous h added to its own gates only."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 9, 3, 4, 4, generator=generator, dtype=torch.float64)  # (b, t, heads, unit, 4)
    recurrent = torch.randn(3, 4, 16, generator=generator, dtype=torch.float64) / 2
    h, c, n = (torch.zeros(2, 3, 4, dtype=torch.float64) for _ in range(3))
    expected = []
    for t in range(9):
        pre = inputs[:, t] + torch.einsum("bhu,hug->bhg", h, recurrent).unflatten(-1, (4, 4))
        i, f, z, o = pre.unbind(-1)
        c = torch.sigmoid(f) * c + i.exp() * torch.tanh(z)
        n = torch.sigmoid(f) * n + i.exp()
        h = torch.sigmoid(o) * c / n
        expected.append(h)
    torch.testing.assert_close(
        slstm_steps(inputs, recurrent)[0], torch.stack(expected, 1), rtol=1e-9, atol=1e-12
    )


def test_the_step_parallel_and_chunkwise_forms_give_the_same_outputs_and_state():
    inputs = mlstm_inputs(37)
    _, carried = mlstm_step(*mlstm_inputs(6, seed=1))  # from a carried state, not zeros
    h, state = mlstm_step(*inputs, carried)
    for form in (
        lambda: mlstm_parallel(*inputs, carried),
        lambda: mlstm_chunkwise(*inputs, carried, chunk_size=5),
        lambda: mlstm_chunkwise(*inputs, carried, chunk_size=1),
    ):
        h_form, state_form = form()
        torch.testing.assert_close(h_form, h, rtol=1e-9, atol=1e-12)
        for tensor, expected in zip(state_form, state, strict=True):
            torch.testing.assert_close(tensor, expected, rtol=1e-9, atol=1e-12)


def test_input_gates_far_beyond_exps_range_overflow_in_no_form():
    """The stabiliser m absorbs the gates' scale: exp(500) would overflow even float64, and every
    form still agrees with the step form."""
    q, k, v, i, log_f = mlstm_inputs(20)
    h, _ = mlstm_step(q, k, v, i + 500, log_f)
    assert torch.isfinite(h).all()
    for chunk_size in (None, 7):
        torch.testing.assert_close(
            mlstm_chunkwise(q, k, v, i + 500, log_f, chunk_size=chunk_size)[0], h, rtol=1e-9, atol=1e-12
        )


def test_closed_gates_keep_outputs_and_gradients_finite_in_float32():
    """Input gates and forget gates far below 0 take the stabiliser below -88, where exp(-m)
    overflows float32: its floor keeps it finite."""
    closed = mlstm_inputs(12)
    closed = (*closed[:3], closed[3] - 200, closed[4] - 100)
    h64, state64 = mlstm_step(*closed)  # where the floor acts, the forms still agree (float64)
    for tensor, expected in zip(mlstm_chunkwise(*closed, chunk_size=5), (h64, state64), strict=True):
        torch.testing.assert_close(tensor, expected, rtol=1e-9, atol=1e-12)
    q, k, v, i, log_f = (t.float().requires_grad_() for t in closed)
    h, _ = mlstm_chunkwise(q, k, v, i, log_f, chunk_size=5)
    h.sum().backward()
    assert torch.isfinite(h).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v, i, log_f))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"slstm_at": [2]},
            "model.net.slstm_at=[2] is not allowed: it must be distinct block numbers from 0 to 1",
        ),
        ({"slstm_at": [1, 1]}, "model.net.slstm_at=[1, 1] is not allowed"),
        ({"num_heads": 3}, "model.net.num_heads=3 does not divide model.net.embedding_size (128)"),
        (
            {"qkv_block_size": 3},
            "model.net.qkv_block_size=3 does not divide model.net.embedding_size * proj_factor (256)",
        ),
        (
            {"softmax": "adaptive", "cutoffs": [5]},
            "model.net.tie_weights=true is not allowed with model.net.softmax=adaptive",
        ),
    ],
)
def test_options_that_cannot_be_built_are_refused_in_one_line(options, message):
    with pytest.raises(UserError) as refused:
        build_network({"_target_": XLSTM, **options}, vocab_size=50)
    assert message in str(refused.value)


def test_the_cpu_preset_composes_an_xlstm():
    cfg = compose_config("model=xlstm_cpu")
    assert cfg.model.net._target_ == XLSTM and "hidden_size" not in cfg.model.net


def test_widths_only_the_blocks_present_split_are_checked():
    mlstm_only = {"_target_": XLSTM, "slstm_at": [], "embedding_size": 202, "num_heads": 4}  # inner 404
    assert network_problems(mlstm_only, vocab_size=50) == []
    assert (
        "does not divide model.net.embedding_size (202)"
        in network_problems({**mlstm_only, "slstm_at": [0]})[0]
    )


def test_an_lstm_presets_keys_under_model_net_xlstm_name_the_way_out():
    lines = network_problems({"_target_": XLSTM, "hidden_size": 200, "num_layers": 2})
    assert lines[-1].startswith("model.net.hidden_size, model.net.num_layers: not options of model/net=xlstm")
    assert "`override /model/net: xlstm`" in lines[-1]


def test_the_cells_run_in_float32_under_a_bfloat16_autocast():
    """bfloat16 would round the forget gates (within 0.05 of 1) to 1 next to a stabiliser of 1 or
    more, and stop adding to the memories' running sums."""
    net = build_network({"_target_": XLSTM, "embedding_size": 16, "num_heads": 2}, vocab_size=50)
    with torch.autocast("cpu", torch.bfloat16):
        _, state = net.features(torch.randint(0, 50, (2, 7)))
    for block_state in state:
        assert all(memory.dtype == torch.float32 for memory in block_state[1:])  # the cell's, not the conv's


def test_the_gpu_preset_is_24m_parameters_tied():
    cfg = compose_config("model=xlstm")
    net = build_network(cfg.model.net, vocab_size=10_000)
    assert 23.5e6 < sum(p.numel() for p in net.parameters()) < 24.5e6
    assert net.decoder.weight is net.embedding.weight
