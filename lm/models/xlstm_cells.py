"""The xLSTM's two cells (Beck et al., NeurIPS 2024), as functions of their gates' pre-activations.

Both gate their input exponentially and keep a stabiliser state m, the running maximum of the log
gates, so that exp() never overflows: every memory is held scaled by exp(-m), and the outputs, ratios
of two such memories, do not depend on m.
- mLSTM: a matrix memory C (key x value) and a normaliser n per head, with no hidden-to-hidden
  connection, so a whole window can be computed at once (the parallel form), chunk by chunk with the
  state carried between chunks (the chunkwise form), or token by token (the step form): three forms
  of one function of the inputs.
- sLSTM: a scalar memory c and normaliser n per unit, with head-wise recurrent weights: step by step.
"""

import math

import torch
import torch.nn.functional as F

# The mLSTM's stabiliser is kept at least -30: its outputs divide by exp(-m) where the normaliser is
# smaller, and below that exp(-m) overflows (float32's range ends near exp(88)). Any m read the same
# way in every form gives the same outputs, and the floor keeps the forms' m equal: unrolled, the
# step form's max(log f + m, i, -30) is the parallel form's maximum, floored at -30.
STABILISER_FLOOR = 30.0
MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C (b, h, dk, dv), n (b, h, dk), m (b, h)


def mlstm_zero_state(q: torch.Tensor, v: torch.Tensor) -> MLSTMState:
    batch, heads, _, key_size = q.shape
    return (
        q.new_zeros(batch, heads, key_size, v.size(-1)),
        q.new_zeros(batch, heads, key_size),
        q.new_zeros(batch, heads),
    )


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    log_f: torch.Tensor,
    state: MLSTMState | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """The mLSTM's step form, token by token: q, k (batch, heads, steps, dk), v (.., dv), the input
    gate's pre-activation i and log forget gate log_f (batch, heads, steps). Returns h (batch, heads,
    steps, dv) and the state after the last step."""
    C, n, m = mlstm_zero_state(q, v) if state is None else state
    outputs = []
    for t in range(q.size(2)):
        m_next = torch.maximum(log_f[..., t] + m, i[..., t]).clamp(min=-STABILISER_FLOOR)
        forget, write = torch.exp(log_f[..., t] + m - m_next), torch.exp(i[..., t] - m_next)
        C = forget[..., None, None] * C + write[..., None, None] * k[..., t, :, None] * v[..., t, None, :]
        n = forget[..., None] * n + write[..., None] * k[..., t, :]
        m = m_next
        numerator = torch.einsum("bhk,bhkv->bhv", q[..., t, :], C)
        denominator = torch.maximum((n * q[..., t, :]).sum(-1).abs(), torch.exp(-m))
        outputs.append(numerator / denominator[..., None])
    return torch.stack(outputs, dim=2), (C, n, m)


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    log_f: torch.Tensor,
    state: MLSTMState | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """The mLSTM's parallel form: the step form's outputs and final state, all steps at once.

    With F_t the sum of log_f up to t, token s reaches step t with log weight F_t - F_s + i_s, and
    the carried memory with F_t + m0; the stabiliser m_t is the largest of them, which is exactly
    the step form's running maximum."""
    C0, n0, m0 = mlstm_zero_state(q, v) if state is None else state
    steps = q.size(2)
    total_log_f = log_f.cumsum(-1)
    log_weights = total_log_f[..., :, None] - total_log_f[..., None, :] + i[..., None, :]  # (b, h, t, s)
    future = torch.ones(steps, steps, dtype=torch.bool, device=q.device).triu(1)
    log_weights = log_weights.masked_fill(future, -math.inf)
    log_carried = total_log_f + m0[..., None]
    m = torch.maximum(log_weights.amax(-1), log_carried).clamp(min=-STABILISER_FLOOR)
    weights = torch.exp(log_weights - m[..., None]) * (q @ k.transpose(-1, -2))
    carried = torch.exp(log_carried - m)
    numerator = weights @ v + carried[..., None] * (q @ C0)
    denominator = weights.sum(-1) + carried * (q @ n0[..., None])[..., 0]
    h = numerator / torch.maximum(denominator.abs(), torch.exp(-m))[..., None]
    # The state after the last step, the same sums read at t = steps.
    log_end = total_log_f[..., -1:] - total_log_f + i  # (b, h, s)
    m_end = torch.maximum(log_end.amax(-1), total_log_f[..., -1] + m0).clamp(min=-STABILISER_FLOOR)
    written = torch.exp(log_end - m_end[..., None])[..., None] * k  # (b, h, s, dk)
    kept = torch.exp(total_log_f[..., -1] + m0 - m_end)
    C = kept[..., None, None] * C0 + written.transpose(-1, -2) @ v
    n = kept[..., None] * n0 + written.sum(-2)
    return h, (C, n, m_end)


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    log_f: torch.Tensor,
    state: MLSTMState | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """The mLSTM's chunkwise form: the parallel form on `chunk_size` tokens at a time, the state
    carried from chunk to chunk (None: one chunk, the parallel form)."""
    size = chunk_size or q.size(2)
    outputs = []
    for start in range(0, q.size(2), size):
        part = slice(start, start + size)
        h, state = mlstm_parallel(
            q[:, :, part], k[:, :, part], v[:, :, part], i[..., part], log_f[..., part], state
        )
        outputs.append(h)
    return torch.cat(outputs, dim=2), state


SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # h, c, n, m: (b, heads, unit)


def slstm_steps(
    inputs: torch.Tensor, recurrent: torch.Tensor, state: SLSTMState | None = None
) -> tuple[torch.Tensor, SLSTMState]:
    """The sLSTM, step by step: `inputs` (batch, steps, heads, unit, 4) are the input-side
    pre-activations of the input, forget, cell-input and output gates; `recurrent` (heads, unit,
    4 * unit) adds each head's previous outputs to them. Returns h (batch, steps, heads, unit)."""
    batch, steps, heads, unit, _ = inputs.shape
    # Looped over in (heads, batch, ...) order, so that each step's recurrence is one batched
    # matrix product over the heads; one unbind, not a slice per step, whose backward would fill a
    # whole window's gradient with zeros at every step.
    if state is None:  # an empty memory; m = -inf makes the first step write with weight 1, so n >= 1
        h, c, n = (inputs.new_zeros(heads, batch, unit) for _ in range(3))
        m = inputs.new_full((heads, batch, unit), -math.inf)
    else:
        h, c, n, m = (s.transpose(0, 1) for s in state)
    outputs = []
    for step_inputs in inputs.permute(1, 2, 0, 3, 4).unbind(0):  # each (heads, batch, unit, 4)
        pre = step_inputs + torch.bmm(h, recurrent).unflatten(-1, (unit, 4))
        i, f, z, o = pre.unbind(-1)
        log_f = F.logsigmoid(f)
        m_next = torch.maximum(log_f + m, i)
        forget, write = torch.exp(log_f + m - m_next), torch.exp(i - m_next)
        c = forget * c + write * torch.tanh(z)
        n = forget * n + write
        m = m_next
        h = torch.sigmoid(o) * c / n
        outputs.append(h)
    return torch.stack(outputs, dim=2).permute(1, 2, 0, 3), tuple(s.transpose(0, 1) for s in (h, c, n, m))
