"""Streams and windows in plain torch (docs/design.md, "Data").

A split of N tokens becomes `batch_size` contiguous streams, each read left to right in windows:

    ids:      t0 t1 t2 ... t(N-1)                     batchify(ids, 3), N // 3 = 6 tokens per stream
    streams:  [ t0  t1  t2  t3  t4  t5 ]   stream 0
              [ t6  t7  t8  t9 t10 t11 ]   stream 1
              [t12 t13 t14 t15 t16 t17 ]   stream 2     (the N % 3 tokens left over are dropped)

    window i (num_steps T = 2):  x = streams[:, 2i : 2i+2],  y = streams[:, 2i+1 : 2i+3]
    windows:  x0 = [t0 t1]  y0 = [t1 t2]    x1 = [t2 t3]  y1 = [t3 t4]    x2 = [t4]  y2 = [t5]
                                                                          (evaluation only: the
                                                                           last, shorter window)

The state carried from window to window follows each stream, so a window's first input continues
where the last window's input ended.
"""

import torch
from torch.utils.data import Dataset, Sampler


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


def longest_variable_window(num_steps: int) -> int:
    """The longest window `variable_lengths` draws about `num_steps` (AWD-LSTM's cap)."""
    return num_steps + 20


def variable_lengths(targets: int, num_steps: int, generator: torch.Generator) -> list[int]:
    """AWD-LSTM's window lengths (Merity et al. 2017), drawn until `targets` are covered.

    Mostly about num_steps, one in twenty about half of it, so that windows start at every
    offset from epoch to epoch: length = max(5, int(N(base, 5))), at most num_steps + 20.
    """
    lengths, covered = [], 0
    while covered < targets:
        base = num_steps if torch.rand(1, generator=generator).item() < 0.95 else num_steps / 2
        length = max(5, int(torch.normal(base, 5.0, (1,), generator=generator).item()))
        lengths.append(min(length, longest_variable_window(num_steps), targets - covered))
        covered += lengths[-1]
    return lengths


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
