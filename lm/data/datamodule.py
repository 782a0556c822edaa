"""The corpora as LightningDataModules: each rank reads its own contiguous rows of every split, in
order (docs/design.md, "Data" and "Many devices"). The one module of lm/data that imports Lightning."""

import logging
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lm.data.options import DataOptions
from lm.data.prepared import Corpus, load_corpus
from lm.data.ptb import SPLITS, URL, ensure_ptb
from lm.data.text import Tokenizer
from lm.data.vocabulary import Vocabulary
from lm.data.wikitext import check_published_counts, ensure_wikitext, wikitext_files
from lm.data.windows import InOrder, WindowDataset, batchify, longest_variable_window, variable_lengths
from lm.errors import UserError
from lm.options import problems, refuse

log = logging.getLogger(__name__)
# The windows of a resumed epoch go on where Lightning's restored progress says (`resumed_position`);
# Lightning cannot see that from the loader and would warn that it is not resumable (the warning,
# and only it, is silenced).
warnings.filterwarnings("ignore", message="You.re resuming from a checkpoint that ended before the epoch")


def resumed_position(trainer: L.Trainer, windows_per_epoch: int) -> int:
    """Windows of the current epoch trained before a mid-epoch checkpoint this run resumed from.

    Lightning restores its count of the epoch's batches and goes on from there; the windows and
    the carried state must go on from the same place (docs/design.md: in order, each once an epoch).
    0 when not resuming, or when the checkpoint was taken at the end of an epoch.

    Not Lightning's resumable-loader route (a loader's `state_dict`, saved by the fit loop): its
    fetcher reads one window ahead of training, so a loader's own count is one ahead at a step's
    end and not at an epoch's, and after the second-to-last step of an epoch the two look alike.
    The restored batch progress is what Lightning itself trusts for "where in the epoch".
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not loop.restarting:
        return 0
    done = loop.epoch_loop.batch_progress.current.processed  # trained on, whether or not saved after it
    return done if done < windows_per_epoch else 0


class TextDataModule(L.LightningDataModule):
    """A corpus's three splits as in-order windows; each rank reads its own contiguous rows.

    `data=text`: a folder holding train.txt, valid.txt and test.txt (UTF-8, a sentence or
    paragraph per line). `batch_size` is the global number of streams, so results do not depend
    on the device count.
    """

    def __init__(self, dir: str, cache_dir: str, **options: Any):
        super().__init__()
        self.dir = Path(dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        refuse(problems(DataOptions, options, "data"))
        self.options = DataOptions(**options)
        self.tokenizer = Tokenizer(self.options.level, self.options.lowercase)
        self.streams: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # Sent to other processes (ddp_spawn) without the streams, views of memory-mapped ids that
        # torch cannot send: each process's `setup` cuts its own from the corpus, which maps anew.
        return {**self.__dict__, "streams": {}}

    def files(self) -> dict[str, Path]:
        """The split files: `<data.dir>/<split>.txt`."""
        if not self.dir.is_dir():
            raise UserError(f"data.dir={self.dir} is not a folder; point it at one holding {_names('.txt')}.")
        files = {split: self.dir / f"{split}.txt" for split in SPLITS}
        missing = [path.name for path in files.values() if not path.is_file()]
        if missing:
            raise UserError(
                f"{self.dir} (data.dir) has no {', '.join(missing)}; a corpus needs {_names('.txt')}."
            )
        return files

    @cached_property
    def corpus(self) -> Corpus:
        files = self.files()
        corpus = load_corpus(
            files, self.cache_dir, self.tokenizer, self.options.min_count, self.options.max_vocab
        )
        unknown = corpus.unknown
        for name, ids in corpus.splits.items():
            if len(ids) == 0:
                raise UserError(f"The {name} split in {self.dir} (data.dir) holds no tokens.")
            if corpus.eos[name] == len(ids):  # blank lines only: it would train or score <eos> alone
                raise UserError(
                    f"The {name} split ({files[name].name} in data.dir={self.dir}) holds only blank lines: "
                    "no word to learn or score."
                )
            share = 100 * unknown[name] / len(ids)
            log.info("%s: %d tokens, %d of them <unk> (%.2f%%)", name, len(ids), unknown[name], share)
        log.info(
            "vocabulary: %d types (%s level%s, min_count %d, max_vocab %s), from the train split of %s",
            len(corpus.vocab),
            self.tokenizer.level,
            ", lowercased" if self.tokenizer.lowercase else "",
            self.options.min_count,
            self.options.max_vocab,
            self.dir,
        )
        return corpus

    @property
    def vocab_size(self) -> int:
        return len(self.corpus.vocab)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.corpus.vocab

    def setup(self, stage: str) -> None:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sizes = {
            "train": (self.options.batch_size, self.options.num_steps, "data.batch_size", "data.num_steps"),
            "valid": (
                self.options.eval_batch_size,
                self.options.num_steps,
                "data.eval_batch_size",
                "data.num_steps",
            ),
            "test": (
                self.options.test_batch_size,
                self.options.test_num_steps,
                "data.test_batch_size",
                "data.test_num_steps",
            ),
        }
        for split, (batch_size, num_steps, batch_key, steps_key) in sizes.items():
            streams = batchify(self.corpus.splits[split], batch_size)
            needed = num_steps + 1 if split == "train" else 2
            if streams.size(1) < needed:
                raise UserError(
                    f"The {split} split of {self.dir} has {len(self.corpus.splits[split])} tokens: "
                    f"{batch_key}={batch_size} streams of {streams.size(1)} tokens, too short for "
                    f"one window of {steps_key}={num_steps}. Lower {batch_key} or {steps_key}."
                )
            self.streams[split] = self._rows_of_rank(streams, rank, world_size, split)

    def fewest_train_windows(self) -> int:
        """The training windows (batches) of an epoch, at fewest: full windows of num_steps, or
        variable ones, which cover every target in windows of at most `longest_variable_window`."""
        targets = max(len(self.corpus.splits["train"]) // self.options.batch_size - 1, 0)
        if not self.options.vary_num_steps:
            return targets // self.options.num_steps
        return -(-targets // longest_variable_window(self.options.num_steps))

    def check_divides(self, world_size: int) -> None:
        """The global batches must split evenly among the processes (docs/design.md, "Many devices")."""
        for key, streams in (
            ("data.batch_size", self.options.batch_size),
            ("data.eval_batch_size", self.options.eval_batch_size),
        ):
            if streams % world_size:
                raise UserError(
                    f"{key}={streams} streams do not divide among {world_size} processes; "
                    f"choose a multiple of {world_size}."
                )

    def _rows_of_rank(self, streams: torch.Tensor, rank: int, world_size: int, split: str) -> torch.Tensor:
        # The batch-1 test protocol cannot be split: every rank scores the whole test stream and
        # the summed NLL and target counts then give the same perplexity.
        if split == "test":
            return streams
        self.check_divides(world_size)
        rows = streams.size(0) // world_size
        return streams[rank * rows : (rank + 1) * rows]

    def _loader(
        self, split: str, num_steps: int, full_windows_only: bool, lengths: list[int] | None = None
    ) -> DataLoader:
        # batch_size=None: each item already is a (streams, num_steps) window; never shuffled. The
        # loader's own generator keeps its start-up draw off the global RNG that dropout uses, so
        # a resumed run draws the same dropout masks as one that never stopped.
        dataset = WindowDataset(self.streams[split], num_steps, full_windows_only, lengths)
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=InOrder(len(dataset)),
            pin_memory=self.options.pin_memory,
            generator=torch.Generator(),
        )

    def train_dataloader(self) -> DataLoader:
        lengths = None
        if self.options.vary_num_steps and self.trainer:
            # New windows each epoch, the same ones for every rank and for a resumed epoch: drawn
            # from the run's seed and the epoch. Their number changes, so Lightning must ask for
            # a new loader every epoch.
            self.trainer.reload_dataloaders_every_n_epochs = 1
            generator = torch.Generator().manual_seed(
                self.options.seed * 100_003 + self.trainer.current_epoch
            )
            lengths = variable_lengths(self.streams["train"].size(1) - 1, self.options.num_steps, generator)
        loader = self._loader("train", self.options.num_steps, full_windows_only=True, lengths=lengths)
        loader.sampler.start = resumed_position(self.trainer, len(loader)) if self.trainer else 0
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.options.num_steps, full_windows_only=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.options.test_num_steps, full_windows_only=False)


class PTBDataModule(TextDataModule):
    """Mikolov's PTB: ptb.<split>.txt in `dir`, downloaded and MD5-checked when missing."""

    def __init__(self, dir: str, cache_dir: str, url: str = URL, **options):
        super().__init__(dir, cache_dir, **options)
        self.url = url

    def files(self) -> dict[str, Path]:
        return ensure_ptb(self.dir, self.url)


class WikiTextDataModule(TextDataModule):
    """WikiText-2 or -103 (`name`): wiki.<split>.tokens in `dir`, downloaded and verified when missing.

    Read as the AWD-LSTM code read them (every line, blank ones included, closed by `<eos>`), so
    the perplexities compare with the published ones.
    """

    def __init__(self, dir: str, cache_dir: str, name: str, url: str, **options):
        super().__init__(dir, cache_dir, **options)
        self.name, self.url = name, url

    def files(self) -> dict[str, Path]:
        return ensure_wikitext(self.dir, self.name, self.url)

    @cached_property
    def corpus(self) -> Corpus:
        corpus = super().corpus
        counts = {split: len(ids) for split, ids in corpus.splits.items()}
        files = wikitext_files(self.dir)
        check_published_counts(
            self.name,
            files,
            counts,
            len(corpus.vocab),
            self.tokenizer,
            self.options.min_count,
            self.options.max_vocab,
        )
        return corpus


def _names(suffix: str) -> str:
    return ", ".join(f"{split}{suffix}" for split in SPLITS[:-1]) + f" and {SPLITS[-1]}{suffix}"
