"""The data's options (data.*), whatever the corpus: its streams and windows, and how its text
becomes tokens. Where the files are (data.dir, data.cache_dir, data.url) is each corpus's own
(conf/data/)."""

from dataclasses import dataclass
from typing import Literal

from lm.options import at_least, option


@dataclass(frozen=True)
class DataOptions:
    """data.*; the presets (conf/model/) set the batch and the window."""

    batch_size: int = option(20, at_least(1))
    """The global number of streams, split over the devices."""
    num_steps: int = option(20, at_least(1))
    """The truncated-BPTT window, in tokens."""
    eval_batch_size: int = option(20, at_least(1))
    """Validation's streams (conf/data/: the training batch, as the paper validated)."""
    test_batch_size: int = option(1, at_least(1))
    """The reported test perplexity: one stream, the state carried over the whole split."""
    test_num_steps: int = option(200, at_least(1))
    """The test's windows: longer makes the batch-1 pass faster, not different."""
    vary_num_steps: bool = option(False)
    """AWD-LSTM's variable training windows about num_steps, the lr scaled by their length."""
    seed: int = option(1, at_least(0))
    """Draws the variable windows, with the epoch (conf/data/: the run's seed)."""
    pin_memory: bool = option(False)
    """True speeds host-to-GPU copies."""
    level: Literal["word", "char"] = option("word")
    """word, or char: characters, a space being one token."""
    lowercase: bool = option(False)
    """Lowercase the text before counting the words."""
    min_count: int = option(1, at_least(1))
    """Words seen fewer times in the training split become <unk>."""
    max_vocab: int | None = option(None, at_least(3))
    """Keep only the most frequent words, <unk> and <eos> included; null: all."""
