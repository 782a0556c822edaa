"""lm/models/xlstm.py: the mLSTM's three forms are one function, the stabiliser never changes an
output, and the options refuse what cannot be built."""

import pytest
import torch
import torch.nn.functional as F

from lm.errors import UserError
from lm.models.network import build_network
from lm.models.xlstm_cells import mlstm_chunkwise, mlstm_parallel, mlstm_step
from tests.conftest import compose_config

XLSTM = "lm.models.xlstm.XLSTMOptions"


def mlstm_inputs(steps: int, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v (batch 2, heads 3, steps, 4 or 5), the input gate and the log forget gate, float64."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = draw(2, 3, steps, 4), draw(2, 3, steps, 4), draw(2, 3, steps, 5)
    return q, k, v, scale * draw(2, 3, steps), F.logsigmoid(scale * draw(2, 3, steps))


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
    q, k, v, i, log_f = (t.float().requires_grad_() for t in mlstm_inputs(12))
    h, _ = mlstm_chunkwise(q, k, v, i - 200, log_f - 100, chunk_size=5)
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
    with pytest.raises(UserError, match=None) as refused:
        build_network({"_target_": XLSTM, **options}, vocab_size=50)
    assert message in str(refused.value)


def test_the_cpu_preset_composes_an_xlstm():
    cfg = compose_config("model=xlstm_cpu")
    assert cfg.model.net._target_ == XLSTM and "hidden_size" not in cfg.model.net
