"""The Python API for applications (README.md, "From Python"): a trained model, from a model folder or
a checkpoint, scoring text, streaming it in pieces, the next word, n-best rescoring and sampling.

    from lm.api import LanguageModel

    model = LanguageModel.load("model/")  # python -m lm.tools.export's folder, or a train.py .ckpt
    model.score("the cat sat").log_prob  # natural log; the line's <eos> is scored too

Text is read as score.py reads a file: a line's tokens, then `<eos>`, after an `<eos>` (a sentence
start). Every pass is lm/evaluation/scoring.py's `score_stream`, so the numbers are score.py's and
evaluate.py's; score.py and generate.py are this API's command lines.
"""

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lm.data.text import EOS
from lm.data.vocabulary import Vocabulary
from lm.evaluation.generation import sample
from lm.evaluation.loading import load_model, pick_device
from lm.evaluation.model_folder import TrainedModel
from lm.evaluation.scoring import perplexity, score_stream
from lm.models.network import State


@dataclass
class Scored:
    """The targets of a piece of text and the natural-log probability of each, given all before it."""

    tokens: list[str]
    log_probs: list[float]
    unknown: list[str] = field(default_factory=list)  # distinct words not in the vocabulary: read as <unk>

    @property
    def log_prob(self) -> float:
        return math.fsum(self.log_probs)

    @property
    def perplexity(self) -> float:
        return perplexity(-self.log_prob, len(self.log_probs)) if self.log_probs else math.nan


class Stream:
    """Text read in pieces, the network's state kept between them: a piece's first token is scored
    after the last piece's last. A line break in a piece is an `<eos>`; `reset` goes back to the start
    of a sentence, as a new stream starts. (A character-level model's tokenizer strips a piece's
    outer spaces, as a line's: split its text between two characters that are not spaces.)"""

    def __init__(self, model: TrainedModel, device: torch.device):
        self.model, self.device = model, device
        self.reset()

    def reset(self) -> None:
        """Forget everything read: the next token is scored after an `<eos>` from the empty state."""
        self.state: State | None = None
        self.last = self.model.vocabulary.encode([EOS])  # read next, as the next target's input

    def fork(self) -> "Stream":
        """A stream at the same point that goes on on its own (the network never changes a state it
        was given, so the two can share it)."""
        return copy.copy(self)

    def score(self, text: str) -> Scored:
        """The targets of `text` after what was read: its tokens, an `<eos>` for each line break."""
        vocabulary = self.model.vocabulary
        tokens = vocabulary.tokenizer.piece_tokens(text)
        if not text.endswith("\n"):
            tokens.pop()  # piece_tokens closes the last line; a piece ends where it ends
        if not tokens:
            return Scored([], [])
        ids = vocabulary.encode(tokens)
        scores = score_stream(self.model.net, torch.cat([self.last, ids]), self.device, state=self.state)
        self.state, self.last = scores.state, ids[-1:]
        return Scored(tokens, scores.log_probs.tolist(), vocabulary.unknown(tokens))

    @torch.no_grad()
    def next_log_probs(self) -> torch.Tensor:
        """log p(token) for every token of the vocabulary (float64) after what was read; reads nothing."""
        self.model.net.eval()
        logits, _ = self.model.net(self.last.view(1, 1).to(self.device), self.state)
        return F.log_softmax(logits[0, -1].double(), dim=-1).cpu()


class LanguageModel:
    """A trained model for applications; see the module's docstring."""

    def __init__(self, model: TrainedModel, device: torch.device | str = "cpu"):
        self.device = pick_device(str(device))
        self.model = model.to(self.device)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "LanguageModel":
        """A model folder (python -m lm.tools.export) or a train.py checkpoint; `device` as the tools'
        device= option: cpu, cuda, cuda:N, or auto (the GPU when there is one)."""
        return cls(load_model(path), device)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.model.vocabulary

    def stream(self) -> Stream:
        """A stream at the start of a sentence; see Stream."""
        return Stream(self.model, self.device)

    def score(self, text: str) -> Scored:
        """Every target of `text` from the start of a sentence: each line's tokens and its `<eos>`."""
        return self.stream().score(text if text.endswith("\n") else text + "\n")

    def next_log_probs(self, context: str = "") -> torch.Tensor:
        """log p(token) for every token of the vocabulary after `context` (read as a piece of a
        sentence from its start: no `<eos>` after it unless it ends with a line break)."""
        stream = self.stream()
        stream.score(context)
        return stream.next_log_probs()

    def next_words(self, context: str = "", k: int = 10) -> list[tuple[str, float]]:
        """The `k` likeliest tokens after `context` (as in `next_log_probs`), with their probabilities."""
        top = self.next_log_probs(context).topk(min(k, len(self.vocabulary)))
        tokens = self.vocabulary.decode(top.indices)
        return [(token, math.exp(p)) for token, p in zip(tokens, top.values.tolist(), strict=True)]

    def rescore(self, hypotheses: list[str], context: str = "") -> list[Scored]:
        """n-best rescoring: each hypothesis scored as a line (its tokens and `<eos>`) from the same
        point, after `context` (as in `next_log_probs`)."""
        start = self.stream()
        start.score(context)
        return [start.fork().score(hypothesis + "\n") for hypothesis in hypotheses]

    def generate(
        self,
        prompt: str = "",
        num_words: int = 50,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """`num_samples` texts, each the prompt (read after an `<eos>`) and `num_words` sampled tokens
        (`<eos>` as a line break); `temperature` 0 is greedy, `top_k` keeps the k likeliest tokens."""
        vocabulary = self.vocabulary
        prompt_tokens = vocabulary.tokenizer.tokens(prompt)
        generator = torch.Generator(self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        ids = sample(
            self.model.net,
            vocabulary.encode([EOS, *prompt_tokens]).to(self.device),
            num_words,
            num_samples,
            temperature,
            top_k,
            generator,
        )
        return [vocabulary.tokenizer.join(prompt_tokens + vocabulary.decode(row)) for row in ids.cpu()]
