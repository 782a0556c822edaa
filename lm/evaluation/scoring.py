"""Log-probabilities of text under a trained model: the one loop of every batch-1 pass.

A text is read as one stream (batch 1, the state carried), and each target is scored exactly
once, before anything learns from it. evaluate.py (plain, dynamic evaluation, the cache, or both)
and score.py run `score_stream`; the adaptations plug into it (dynamic_eval.py, cache.py).
Lightning's test step, which train.py's final test runs, scores the same protocol in
lm/training/module.py.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm.data.text import EOS, text_tokens
from lm.data.vocabulary import Vocabulary
from lm.data.windows import WindowDataset
from lm.evaluation.cache import NeuralCache
from lm.evaluation.dynamic_eval import DynamicEvaluation
from lm.models.network import Network, State, map_state


def stream_pieces(ids: torch.Tensor, length: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation windows (lm/data/windows.py's WindowDataset) of one stream (batch 1) of `length`
    tokens, the last one shorter: the test protocol. Read in order without a DataLoader, whose work
    per window (tens of microseconds) would count in a loop of 5-token segments."""
    windows = WindowDataset(ids.view(1, -1), length, full_windows_only=False)
    return (windows[i] for i in range(len(windows)))


def text_ids(text: str, vocabulary: Vocabulary) -> tuple[torch.Tensor, list[str]]:
    """Ids of `<eos>` + the text's tokens (so that its first token is scored too), and the
    distinct tokens that the vocabulary lacks (they become `<unk>`)."""
    tokens = [EOS, *text_tokens(text, vocabulary.tokenizer)]
    return vocabulary.encode(tokens), vocabulary.unknown(tokens)


def perplexity(nll: float, targets: int) -> float:
    """exp(nll / targets); inf beyond a float's range (exp(709.8)), where math.exp would raise: weights
    that are finite but huge, or an adaptation that diverged, give such a perplexity."""
    try:
        return math.exp(nll / targets)
    except OverflowError:
        return math.inf


@dataclass
class Scores:
    """Every target's natural-log probability (float64), whether it was the likeliest token, and the
    state after the stream (its last token not yet read: it is the next stream's first input)."""

    log_probs: torch.Tensor
    likeliest: torch.Tensor
    state: State | None = None

    def perplexity(self) -> float:
        return perplexity(-self.log_probs.sum().item(), len(self.log_probs))

    def accuracy(self) -> float:
        return self.likeliest.double().mean().item()


def score_stream(
    net: Network,
    ids: torch.Tensor,
    device: torch.device,
    chunk_length: int = 200,
    dynamic: DynamicEvaluation | None = None,
    cache: NeuralCache | None = None,
    state: State | None = None,
) -> Scores:
    """The targets ids[1:] of `ids` read as one stream from `state` (None: the empty state), in
    evaluation mode.

    `chunk_length` tokens are scored at once: it changes the speed, not the scores. With
    `dynamic`, the stream goes in its segments instead, and the weights learn from each segment
    after it is scored. With `cache`, each chunk's distributions are the model's mixed with the
    cache, which then remembers the chunk; with both, the adapted model's are.
    """
    net.eval()
    log_probs, likeliest = [], []
    length = dynamic.segment_length if dynamic else chunk_length
    with dynamic.adapting() if dynamic else torch.no_grad():
        for x, y in stream_pieces(ids, length):
            x, y = x.to(device), y.to(device)
            features, state = net.features(x, state)
            state = map_state(torch.Tensor.detach, state)
            if cache is None:  # the targets' log-probabilities only (the adaptive softmax's clusters)
                target_log_probs, best = net.evaluate_targets(features, y)
                scored, correct = target_log_probs[0].detach().double(), best[0] == y[0]
            else:  # the whole distribution, to mix with the cache's
                logits = net.logits(features)
                model_log_probs = F.log_softmax(logits[0].detach().double(), dim=-1)
                mixed = cache.mix(model_log_probs, features[0].detach(), y[0])
                scored, correct = mixed.gather(1, y[0, :, None])[:, 0], mixed.argmax(-1) == y[0]
            log_probs.append(scored)
            likeliest.append(correct)
            if dynamic:  # only now, the segment scored, do the weights learn from it
                mean_nll = -target_log_probs.mean() if cache is None else F.cross_entropy(logits[0], y[0])
                dynamic.learn(mean_nll)
    return Scores(torch.cat(log_probs), torch.cat(likeliest), state)
