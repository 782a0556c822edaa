"""The tools' own options (evaluate.py, generate.py, score.py), declared once as lm/options.py
describes; the adaptations' are declared beside their code (dynamic_eval.py, cache.py)."""

from dataclasses import dataclass
from typing import Literal

from lm.options import SEED, Rule, at_least, option


@dataclass(frozen=True)
class EvaluateOptions:
    """evaluate.py's keys besides the checkpoint, the corpus, the device and the adaptations."""

    split: Literal["test", "valid", "train"] = option("test")
    """The split of data.dir scored, as one stream: batch 1, the state carried (file= scores a file)."""
    chunk_length: int = option(200, at_least(1))
    """Tokens scored at once (conf/evaluate.yaml: data.test_num_steps): the pass's speed, not its result."""


@dataclass(frozen=True)
class SamplingOptions:
    """generate.py's keys besides the checkpoint, the prompt and the device."""

    num_words: int = option(50, at_least(0))
    """Tokens to sample after the prompt (characters for a char-level model)."""
    num_samples: int = option(1, at_least(1))
    """Continuations, sampled together in one batch."""
    temperature: float = option(1.0, Rule(lambda t: t == 0 or t >= 1e-3, ": 0 (greedy) or at least 0.001"))
    """0 takes the likeliest token each time (greedy); above 1 flattens the distribution, up to
    uniform sampling (among the top_k) for a very large one. inf is refused, as any non-finite number."""
    top_k: int | None = option(None, at_least(0))
    """Sample among the k likeliest tokens only; null, 0 or more than the vocabulary: all."""
    seed: int = option(1, SEED)
    """The same seed and device give the same text. The range of train.py's seed (Lightning's
    seed_everything, NumPy's); torch's generator alone would take up to 2**64 - 1."""


@dataclass(frozen=True)
class ScoreOptions:
    """score.py's keys besides the checkpoint, the file, the output and the device."""

    carry_state: bool = option(False)
    """false: each line from a fresh state (for reranking); true: the state flows through the file."""
    format: Literal["tsv", "json"] = option("tsv")
    """The scores' format."""


@dataclass(frozen=True)
class ExportOptions:
    """python -m lm.tools.export's keys besides the checkpoint and the folder (docs/export.md)."""

    onnx: bool = option(False)
    """Also model.onnx: token ids and the state in, log-probabilities and the new state out."""
    int8: bool = option(False)
    """Also model.int8.onnx: model.onnx, its weights quantised to int8 by ONNX Runtime (needs onnx=true)."""
    overwrite: bool = option(False)
    """Write into an `out` that holds files: the model folder's own are replaced, others kept."""
