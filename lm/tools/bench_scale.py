"""The token pipeline and the softmax at WikiText-103's scale, against targets (docs/performance.md).

    python -m lm.tools.bench_scale                     # a synthetic corpus of WikiText-103's shape
    python -m lm.tools.bench_scale --corpus DIR        # any corpus: DIR holds train.txt, valid.txt, test.txt
    python -m lm.tools.bench_scale --train-tokens 2000000 --types 30000 --steps 4   # a quick look

Prints, and writes as bench_scale.json into --work: the preparation's time and peak memory, a
cached start's, train tokens/s with the full and the adaptive softmax (alternating in one process,
so their ratio is fair on a noisy machine), and the time and peak memory of `train.py` itself,
cold and warm. Each measurement runs in a fresh process, so its peak memory is its own.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lm import PROJECT_ROOT

# WikiText-103 (Merity et al. 2016), tokens with <eos>, and the types of its training split.
WIKITEXT103 = {"train": 103_227_021, "valid": 217_646, "test": 245_569, "types": 267_735}


def write_zipf_corpus(folder: Path, split_tokens: dict[str, int], types: int, seed: int = 0) -> None:
    """train.txt, valid.txt and test.txt of Zipf-distributed words (p(rank r) ~ 1 / (r + 2.7), as
    English) in WikiText's layout: paragraphs of ~60 words between blank lines, spaces around each.

    `split_tokens` counts every line's `<eos>`, as the published figures do; the training split
    holds nearly every one of the `types` (the rarest word is expected ~30 times in 103M), `<eos>`
    and `<unk>` (which the vocabulary adds) included.
    """
    rng = np.random.default_rng(seed)
    words = _distinct_words(types - 2, rng)
    cumulative = np.cumsum(1 / (np.arange(len(words)) + 2.7))
    cumulative /= cumulative[-1]
    folder.mkdir(parents=True, exist_ok=True)
    for split, tokens in split_tokens.items():
        with open(folder / f"{split}.txt", "w", encoding="utf-8") as f:
            written = 0
            while written < tokens:
                # A paragraph of n words is n + 1 tokens, and the blank line after it one more.
                lengths = rng.geometric(1 / 60, size=10_000)
                ids = np.searchsorted(cumulative, rng.random(int(lengths.sum())))
                paragraphs = np.split(words[ids], np.cumsum(lengths)[:-1])
                for paragraph in paragraphs:
                    room = tokens - written
                    if len(paragraph) + 2 > room:  # the last line: cut to fit, no blank line after
                        f.write(f" {' '.join(paragraph[: room - 1])} \n")
                        written = tokens
                        break
                    f.write(f" {' '.join(paragraph)} \n \n")
                    written += len(paragraph) + 2


def _distinct_words(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct lowercase words, about 7 letters long, shorter ones more frequent."""
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words: dict[str, None] = {}
    while len(words) < count:
        lengths = np.clip(rng.poisson(6, size=count), 2, 16)
        codes = letters[rng.integers(0, 26, size=int(lengths.sum()))].tobytes().decode()
        for end, length in zip(np.cumsum(lengths).tolist(), lengths.tolist(), strict=True):
            words[codes[end - length : end]] = None
    return np.array(sorted(list(words)[:count], key=len), dtype=object)


def measured(*command: str) -> dict:
    """Run a command in a fresh process: its wall time, its own peak memory (wait4's, which covers
    the processes it waited for too) and, for a phase of this module, the JSON line it printed."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    ) as child:
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output}")
    result = {
        "process_seconds": time.perf_counter() - started,
        "process_peak_rss_mib": usage.ru_maxrss / 1024,
    }
    if "--phase" in command:
        result |= json.loads(output.splitlines()[-1])
    return result


def phase(*args: str) -> dict:
    return measured(sys.executable, "-m", "lm.tools.bench_scale", "--phase", *args)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_phase(corpus: Path, cache: Path) -> dict:
    """Open (or, with an empty cache, prepare) the corpus as `data=text` does."""
    started = time.perf_counter()
    from lm.data.datamodule import TextDataModule

    imported = time.perf_counter()
    datamodule = TextDataModule(str(corpus), str(cache), batch_size=20, num_steps=35)
    datamodule.setup("fit")
    return {
        "seconds": time.perf_counter() - imported,
        "import_seconds": imported - started,
        "types": datamodule.vocab_size,
        "train_tokens": len(datamodule.corpus.splits["train"]),
        "peak_rss_mib": peak_rss_mib(),
    }


def train_phase(corpus: Path, cache: Path, hidden_size: int, cutoffs: list[int], steps: int) -> dict:
    """Train tokens/s of the full and the adaptive softmax with `lm.tools.bench`'s plain loop, each
    timed over `steps` windows after one untimed, the two alternating twice."""
    import torch

    from lm.allocator import keep_freed_memory
    from lm.data.datamodule import TextDataModule
    from lm.tools.bench import PlainLoop
    from lm.training.module import LanguageModel

    keep_freed_memory()  # as train.py does: the full softmax frees and refaults 0.75 GB a step otherwise
    torch.manual_seed(0)
    datamodule = TextDataModule(str(corpus), str(cache), batch_size=20, num_steps=35)
    datamodule.setup("fit")
    lstm = {"_target_": "lm.models.lstm.LSTMOptions", "hidden_size": hidden_size, "num_layers": 2}
    models = {
        "full": LanguageModel(datamodule.vocab_size, lstm),
        "adaptive": LanguageModel(datamodule.vocab_size, {**lstm, "softmax": "adaptive", "cutoffs": cutoffs}),
    }
    loops = {name: PlainLoop(model, clip=5.0, device=torch.device("cpu")) for name, model in models.items()}
    seconds = dict.fromkeys(models, 0.0)
    for round_ in range(3):
        for name, loop in loops.items():
            rate = loop.tokens_per_sec(datamodule.train_dataloader(), steps if round_ else 1)
            if round_:
                seconds[name] += steps * 20 * 35 / rate
    tokens = 2 * steps * 20 * 35
    return {
        **{f"{name}_train_tokens_per_sec": tokens / s for name, s in seconds.items()},
        "adaptive_over_full": seconds["full"] / seconds["adaptive"],
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, help="a folder with train.txt, valid.txt and test.txt")
    parser.add_argument("--work", type=Path, default=PROJECT_ROOT / "outputs" / "bench_scale")
    parser.add_argument("--train-tokens", type=int, default=WIKITEXT103["train"])
    parser.add_argument("--types", type=int, default=WIKITEXT103["types"])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--cutoffs", type=int, nargs="+", default=[20_000, 60_000])
    parser.add_argument("--steps", type=int, default=10, help="timed training windows per softmax and round")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a measurement, in its own process
        name, *rest = args.phase
        if name == "prepare":
            result = prepare_phase(Path(rest[0]), Path(rest[1]))
        else:
            corpus, cache, hidden, steps, *cutoffs = rest
            result = train_phase(Path(corpus), Path(cache), int(hidden), list(map(int, cutoffs)), int(steps))
        print(json.dumps(result))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus
    results: dict = {}
    if corpus is None:
        corpus = args.work / f"zipf-{args.train_tokens}-{args.types}"
        if not (corpus / "test.txt").exists():
            started = time.perf_counter()
            scale = args.train_tokens / WIKITEXT103["train"]
            sizes = {"train": args.train_tokens} | {
                s: max(int(WIKITEXT103[s] * scale), 1000) for s in ("valid", "test")
            }
            write_zipf_corpus(corpus, sizes, args.types)
            results["corpus_written_seconds"] = time.perf_counter() - started
    results["corpus_bytes"] = sum(
        (corpus / f"{split}.txt").stat().st_size for split in ("train", "valid", "test")
    )
    cache = args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    results["prepare"] = phase("prepare", str(corpus), str(cache))
    # The first start after preparing may hash the text once more, if it was written moments
    # before (lm/data/cache_check.py, `settled`); the second is every later start.
    phase("prepare", str(corpus), str(cache))
    results["cached_start"] = phase("prepare", str(corpus), str(cache))
    steps = [str(args.hidden_size), str(args.steps), *map(str, args.cutoffs)]
    results["train"] = phase("train", str(corpus), str(cache), *steps)
    # train.py as a user runs it: one training step, one validation and one test window, with an
    # empty cache (cold) and then with the prepared corpus (warm).
    train = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        "data=text",
        f"data.dir={corpus}",
        f"model.net.hidden_size={args.hidden_size}",
        "model.net.softmax=adaptive",
        f"model.net.cutoffs=[{','.join(map(str, args.cutoffs))}]",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
    ]
    for name, cache_dir in (
        ("train_py_cold", args.work / "train_cache"),
        ("train_py_warm", args.work / "train_cache"),
    ):
        if name.endswith("cold"):
            shutil.rmtree(cache_dir, ignore_errors=True)
        run_dir = args.work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        results[name] = measured(*train, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}")
    print(json.dumps(results, indent=2))
    (args.work / "bench_scale.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
