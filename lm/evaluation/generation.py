"""Sampling continuations of a prompt from a trained model."""

import torch

from lm.models.network import Network


@torch.no_grad()
def sample(
    net: Network,
    prompt: torch.Tensor,
    num_words: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(num_samples, num_words) token ids following the `prompt` ids, all samples in one batch.

    `temperature` 0 takes the most likely token (greedy), a very large one samples uniformly;
    `top_k` samples among the k likeliest (all of them when k is 0, None or above the vocabulary).
    """
    x = prompt.view(1, -1).expand(num_samples, -1)
    state, words = None, []
    for _ in range(num_words):
        logits, state = net(x, state)
        logits = logits[:, -1].float()
        if temperature == 0:
            x = logits.argmax(dim=-1, keepdim=True)
        else:
            # Scaled before the tokens outside the top k are masked: a temperature beyond float32's
            # range scales every logit to 0 (uniform sampling), where -inf / inf would be NaN.
            scaled = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
                scaled = scaled.masked_fill(logits < kth, -torch.inf)
            x = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)
        words.append(x)
    return torch.cat(words, dim=1) if words else prompt.new_zeros(num_samples, 0)
