"""The data path: text and tokens, the vocabulary, prepared ids, streams and windows, the corpora."""
