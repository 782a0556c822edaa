"""Log-probabilities of text under a trained model, each target scored exactly once."""

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lm.corpus import EOS, Vocabulary, text_tokens
from lm.data import WindowDataset
from lm.model import LSTMLanguageModel


def stream_loader(ids: torch.Tensor, num_steps: int) -> DataLoader:
    """One stream (batch 1) in `num_steps` windows, the last one shorter: the test protocol."""
    dataset = WindowDataset(ids.view(1, -1), num_steps, full_windows_only=False)
    return DataLoader(dataset, batch_size=None, shuffle=False)


def text_ids(text: str, vocabulary: Vocabulary) -> tuple[torch.Tensor, list[str]]:
    """Ids of `<eos>` + the text's tokens (so that its first token is scored too), and the
    distinct tokens that the vocabulary lacks (they become `<unk>`)."""
    tokens = [EOS, *text_tokens(text, vocabulary.tokenizer)]
    return vocabulary.encode(tokens), vocabulary.unknown(tokens)


@torch.no_grad()
def line_log_probs(
    net: LSTMLanguageModel, vocabulary: Vocabulary, lines: list[str], carry_state: bool, device: torch.device
) -> list[tuple[int, float]]:
    """(targets, natural-log probability) of each line: its tokens and its `<eos>`, read after an
    `<eos>`. With `carry_state` the state flows from line to line, and the lines' sum is the
    log-probability of the whole text as `text_ids` reads it."""
    results, state = [], None
    for line in lines:
        ids = vocabulary.encode([EOS, *vocabulary.tokenizer.tokens(line), EOS]).to(device)
        logits, next_state = net(ids[:-1].view(1, -1), state if carry_state else None)
        log_probs = F.log_softmax(logits[0].float(), dim=-1).gather(1, ids[1:].view(-1, 1))
        results.append((len(ids) - 1, log_probs.double().sum().item()))
        state = next_state
    return results
