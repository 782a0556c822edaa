"""A corpus as contiguous streams read in `num_steps` windows (design.md, "Data" and "Many devices")."""

import logging
import warnings
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lm.corpus import Corpus, Tokenizer, Vocabulary, load_corpus
from lm.errors import UserError
from lm.ptb import SPLITS, URL, ensure_ptb
from lm.wikitext import check_published_counts, ensure_wikitext, wikitext_files

log = logging.getLogger(__name__)
# The windows of a resumed epoch go on where Lightning's restored progress says (`resumed_position`);
# Lightning cannot see that from the loader and would warn that it is not resumable (the warning,
# and only it, is silenced).
warnings.filterwarnings("ignore", message="You.re resuming from a checkpoint that ended before the epoch")


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(batch_size, tokens_per_stream): row b is the b-th contiguous slice of the text."""
    tokens_per_stream = len(ids) // batch_size
    return ids[: batch_size * tokens_per_stream].view(batch_size, tokens_per_stream)


class WindowDataset(Dataset):
    """Window i of the streams: x = streams[:, start:end] and y = x shifted by one token.

    Windows of `num_steps`, or of the given `lengths` in order (variable windows), each starting
    where the last one ended. Training keeps only full windows; evaluation also takes the last,
    shorter one so that every target of the split is scored exactly once.
    """

    def __init__(
        self,
        streams: torch.Tensor,
        num_steps: int,
        full_windows_only: bool,
        lengths: list[int] | None = None,
    ):
        self.streams = streams
        targets = streams.size(1) - 1
        if lengths is None:
            lengths = [num_steps] * (targets // num_steps if full_windows_only else -(-targets // num_steps))
        ends = torch.tensor(lengths, dtype=torch.long).cumsum(0).clamp(max=targets).tolist()
        self.bounds = [(start, end) for start, end in zip([0, *ends][:-1], ends, strict=True) if end > start]

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self.bounds):
            raise IndexError(i)
        start, end = self.bounds[i]  # int64 for the embedding; the streams may be memory-mapped uint16
        return self.streams[:, start:end].long(), self.streams[:, start + 1 : end + 1].long()


def variable_lengths(targets: int, num_steps: int, generator: torch.Generator) -> list[int]:
    """AWD-LSTM's window lengths (Merity et al. 2017), drawn until `targets` are covered.

    Mostly about num_steps, one in twenty about half of it, so that windows start at every
    offset from epoch to epoch: length = max(5, int(N(base, 5))), at most num_steps + 20.
    """
    lengths, covered = [], 0
    while covered < targets:
        base = num_steps if torch.rand(1, generator=generator).item() < 0.95 else num_steps / 2
        length = max(5, int(torch.normal(base, 5.0, (1,), generator=generator).item()))
        lengths.append(min(length, num_steps + 20, targets - covered))
        covered += lengths[-1]
    return lengths


def resumed_position(trainer: L.Trainer, windows_per_epoch: int) -> int:
    """Windows of the current epoch trained before a mid-epoch checkpoint this run resumed from.

    Lightning restores its count of the epoch's batches and goes on from there; the windows and
    the carried state must go on from the same place (design.md: in order, each once an epoch).
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


class InOrder(Sampler[int]):
    """Window indices in order; the first pass starts at `start` (a resumed epoch), later ones at 0."""

    def __init__(self, num_windows: int):
        self.num_windows = num_windows
        self.start = 0

    def __len__(self) -> int:
        return self.num_windows  # Lightning counts the epoch's batches from its own restored progress

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(range(start, self.num_windows))


class TextDataModule(L.LightningDataModule):
    """A corpus's three splits as in-order windows; each rank reads its own contiguous rows.

    `data=text`: a folder holding train.txt, valid.txt and test.txt (UTF-8, a sentence or
    paragraph per line). `batch_size` is the global number of streams, so results do not depend
    on the device count.
    """

    def __init__(
        self,
        dir: str,
        cache_dir: str,
        batch_size: int = 20,
        num_steps: int = 20,
        eval_batch_size: int = 20,
        test_batch_size: int = 1,
        test_num_steps: int = 200,
        level: str = "word",
        lowercase: bool = False,
        min_count: int = 1,
        max_vocab: int | None = None,
        pin_memory: bool = False,
        vary_num_steps: bool = False,
        seed: int = 1,
    ):
        super().__init__()
        self.dir = Path(dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.eval_batch_size = eval_batch_size
        self.test_batch_size = test_batch_size
        self.test_num_steps = test_num_steps
        self.tokenizer = Tokenizer(level, lowercase)
        if min_count < 1:
            raise UserError(f"data.min_count={min_count}: a word must be seen at least once; use 1 or more.")
        if max_vocab is not None and max_vocab < 3:
            raise UserError(
                f"data.max_vocab={max_vocab} leaves no room beside <unk> and <eos>; use 3 or more."
            )
        self.min_count = min_count
        self.max_vocab = max_vocab
        self.pin_memory = pin_memory
        self.vary_num_steps, self.seed = vary_num_steps, seed
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
        corpus = load_corpus(files, self.cache_dir, self.tokenizer, self.min_count, self.max_vocab)
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
            self.min_count,
            self.max_vocab,
            self.dir,
        )
        return corpus

    @property
    def vocab_size(self) -> int:
        return len(self.corpus.vocab)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.corpus.vocab

    def prepare_data(self) -> None:
        """Download, verify and cache on one process per node before the others read the corpus.

        (train.py reads `vocab_size` first, which already did it.)
        """
        self.corpus  # noqa: B018 (the property does the work)

    def setup(self, stage: str) -> None:
        # Private, but the Trainer's only record of the option: Lightning's sampler would re-split the
        # rows' windows among the ranks and, with several processes, read each rank's in another order.
        if self.trainer and self.trainer._accelerator_connector.use_distributed_sampler:
            raise UserError(
                "trainer.use_distributed_sampler=true would let Lightning re-split and reorder the "
                "windows, which each rank reads in order from its own streams: set "
                "trainer.use_distributed_sampler=false."
            )
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sizes = {
            "train": (self.batch_size, self.num_steps, "data.batch_size", "data.num_steps"),
            "valid": (self.eval_batch_size, self.num_steps, "data.eval_batch_size", "data.num_steps"),
            "test": (
                self.test_batch_size,
                self.test_num_steps,
                "data.test_batch_size",
                "data.test_num_steps",
            ),
        }
        for split, (batch_size, num_steps, batch_key, steps_key) in sizes.items():
            if batch_size < 1 or num_steps < 1:
                raise UserError(f"{batch_key}={batch_size} and {steps_key}={num_steps} must be at least 1.")
            streams = batchify(self.corpus.splits[split], batch_size)
            needed = num_steps + 1 if split == "train" else 2
            if streams.size(1) < needed:
                raise UserError(
                    f"The {split} split of {self.dir} has {len(self.corpus.splits[split])} tokens: "
                    f"{batch_key}={batch_size} streams of {streams.size(1)} tokens, too short for "
                    f"one window of {steps_key}={num_steps}. Lower {batch_key} or {steps_key}."
                )
            self.streams[split] = self._rows_of_rank(streams, rank, world_size, split)

    def check_divides(self, world_size: int) -> None:
        """The global batches must split evenly among the processes (design.md, "Many devices")."""
        for key, streams in (
            ("data.batch_size", self.batch_size),
            ("data.eval_batch_size", self.eval_batch_size),
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
            pin_memory=self.pin_memory,
            generator=torch.Generator(),
        )

    def train_dataloader(self) -> DataLoader:
        lengths = None
        if self.vary_num_steps and self.trainer:
            # New windows each epoch, the same ones for every rank and for a resumed epoch: drawn
            # from the run's seed and the epoch. Their number changes, so Lightning must ask for
            # a new loader every epoch.
            self.trainer.reload_dataloaders_every_n_epochs = 1
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.trainer.current_epoch)
            lengths = variable_lengths(self.streams["train"].size(1) - 1, self.num_steps, generator)
        loader = self._loader("train", self.num_steps, full_windows_only=True, lengths=lengths)
        loader.sampler.start = resumed_position(self.trainer, len(loader)) if self.trainer else 0
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.num_steps, full_windows_only=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_num_steps, full_windows_only=False)


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
            self.name, files, counts, len(corpus.vocab), self.tokenizer, self.min_count, self.max_vocab
        )
        return corpus


def _names(suffix: str) -> str:
    return ", ".join(f"{split}{suffix}" for split in SPLITS[:-1]) + f" and {SPLITS[-1]}{suffix}"
