"""Speed-ups change how fast the numbers come, never the numbers (same seed)."""

import json
import os
import resource
import subprocess
import sys

import lightning as L
import pytest
import torch

from lm import PROJECT_ROOT
from lm.data.datamodule import PTBDataModule
from lm.training.metrics import summed_nll
from tests.conftest import language_model, quiet_trainer


def validation_perplexity(corpus, tmp_path, hidden_size: int = 16, **model_options) -> float:
    L.seed_everything(3)
    datamodule = PTBDataModule(dir=corpus, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=4)
    model = language_model(datamodule.vocab_size, hidden_size=hidden_size, dropout=0.2, **model_options)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=40, gradient_clip_val=5)
    trainer.fit(model, datamodule=datamodule)
    return trainer.callback_metrics["val/ppl"].item()


# Above 32 MiB, the most glibc's own mmap threshold rises to: mmap'd by default, whatever ran before.
BLOCK = 64 * 2**20


def freed_block_reuse() -> dict[str, float]:
    """A 64 MiB tensor allocated, filled and freed, four times: the least that a free gives back to
    the kernel (MiB), and the least share of its pages that fault in again when it is allocated anew.
    The least of four: now and then a block is placed afresh whatever glibc keeps (seen once in a
    full suite: one block of the four)."""
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for _ in range(2):  # the first ones fault in any case: a kept block is placed in the heap's growth
        torch.ones(BLOCK // 4)
    given_back, refaulted = [], []
    for _ in range(4):
        before = faults()
        block = torch.ones(BLOCK // 4)
        refaulted.append((faults() - before) / (BLOCK / page))
        held = resident()
        del block
        given_back.append((held - resident()) / 2**20)
    return {"given_back_mib": min(given_back), "pages_refaulted": min(refaulted)}


# A fresh process: glibc's settings last as long as the process, and in this worker any test that
# ran train.py's or the benchmark's code in-process has already called keep_freed_memory.
ALLOCATOR_CHECK = """
import json, sys
from pathlib import Path
from lm.allocator import keep_freed_memory
from tests.test_performance import freed_block_reuse, validation_perplexity
corpus, tmp_path = Path(sys.argv[1]), Path(sys.argv[2])
before = {**freed_block_reuse(), "ppl": validation_perplexity(corpus, tmp_path, hidden_size=256)}
kept = keep_freed_memory()
after = {**freed_block_reuse(), "ppl": validation_perplexity(corpus, tmp_path, hidden_size=256)}
print(json.dumps({"before": before, "kept": kept, "after": after}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keeping_freed_memory_reuses_freed_blocks_and_leaves_the_numbers_bit_identical(tiny_corpus, tmp_path):
    # The data cache is written here, so that the child's runs only read it.
    assert PTBDataModule(dir=tiny_corpus, cache_dir=tmp_path / "cache", url="file:///nowhere").vocab_size
    # glibc's own defaults in the child: no preloaded allocator, no malloc tunables.
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not key.startswith("MALLOC_")
    }
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_CHECK, str(tiny_corpus), str(tmp_path)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check = json.loads(result.stdout.splitlines()[-1])
    before, after = check["before"], check["after"]
    assert check["kept"]
    # By default a freed block of megabytes goes back to the kernel, and faults in again when it
    # is allocated anew (page by page; by huge pages where the kernel backs it so).
    assert before["given_back_mib"] > 32, check
    # Kept, it stays in the process and is reused without a fault.
    assert after["given_back_mib"] < 1 and after["pages_refaulted"] < 0.01, check
    # The runs' weight matrices and gradients are 1 MiB each (hidden 256), above glibc's initial
    # 128 KiB mmap threshold, so their memory is handled otherwise (a warm run here: some 75,000
    # page faults before, 3,500 after): the numbers do not change by a bit.
    assert after["ppl"] == before["ppl"]


def test_compiled_loss_gives_the_same_perplexity(tiny_corpus, tmp_path):
    eager = validation_perplexity(tiny_corpus, tmp_path)
    compiled = validation_perplexity(tiny_corpus, tmp_path, compile=True)
    model = language_model(vocab_size=12, compile=True)
    model.setup("fit")
    assert model.summed_nll is not summed_nll  # the compiled one is in use
    assert compiled == pytest.approx(eager, rel=1e-5)
