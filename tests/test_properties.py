"""Properties of tokenising, the vocabulary and the windows on random text (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.data.text import EOS, UNK, Tokenizer
from lm.data.windows import WindowDataset, batchify
from tests.conftest import build_vocabulary

# Any word but the special tokens, which a text may use as PTB does ("<unk>" in it is <unk>).
words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=6
).filter(lambda word: word not in (EOS, UNK))
lines = st.lists(st.lists(words, max_size=12).map(" ".join), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(lines, st.sampled_from(["word", "char"]), st.booleans())
def test_ids_round_trip_to_the_tokens_of_every_line(text_lines, level, lowercase):
    tokenizer = Tokenizer(level, lowercase)
    tokens = [token for line in text_lines for token in [*tokenizer.tokens(line), EOS]]
    vocabulary = build_vocabulary(tokens, tokenizer)
    assert vocabulary.decode(vocabulary.encode(tokens)) == tokens
    joined = tokenizer.join(tokens)
    expected = "".join(
        " ".join(line.lower().split() if lowercase else line.split()) + "\n" for line in text_lines
    )
    assert joined == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 400), st.integers(1, 9), st.integers(1, 30), st.booleans())
def test_windows_score_every_target_once_and_stay_inside_their_stream(
    length, batch_size, num_steps, full_only
):
    ids = torch.arange(length)
    if length // batch_size < 2:
        return  # too short for a single target per stream; the datamodule refuses it
    streams = batchify(ids, batch_size)
    windows = list(WindowDataset(streams, num_steps, full_windows_only=full_only))
    start = 0
    for x, y in windows:
        end = start + x.size(1)
        assert torch.equal(x, streams[:, start:end]) and torch.equal(y, streams[:, start + 1 : end + 1])
        assert end <= streams.size(1) - 1  # the last target is the stream's last token, never past it
        start = end
    targets = torch.cat([y for _, y in windows], dim=1) if windows else streams[:, :0]
    if full_only:
        assert torch.equal(
            targets, streams[:, 1 : 1 + targets.size(1)]
        )  # in order, a whole number of windows
        assert streams.size(1) - 1 - targets.size(1) < num_steps
    else:
        assert torch.equal(targets, streams[:, 1:])  # evaluation: every target exactly once


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 8))
def test_streams_are_the_text_in_order_cut_into_rows(length, batch_size):
    streams = batchify(torch.arange(length), batch_size)
    assert streams.shape == (batch_size, length // batch_size)
    assert torch.equal(streams.flatten(), torch.arange(batch_size * (length // batch_size)))
