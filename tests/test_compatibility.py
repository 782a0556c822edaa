"""Checkpoints written before the code moved into lm/data, lm/models, lm/training and lm/evaluation
still load: evaluate.py gives their test perplexity to every digit, and resume= continues their
run as the code of that time would have.

The fixture is a run folder's checkpoints/ from commit 3217f87, made in /tmp/lm-legacy-fixture
(the paths its callbacks recorded) on the corpus of `write_tiny_corpus(Path("tiny"))`:

    python train.py model.hidden_size=16 data.batch_size=8 data.num_steps=20 trainer.max_epochs=1 \\
        trainer.enable_progress_bar=false trainer.enable_model_summary=false \\
        data.dir=tiny data.cache_dir=cache hydra.run.dir=/tmp/lm-legacy-fixture/run

The same command at 3217f87 with trainer.max_epochs=2 gave the two-epoch figures below.
"""

import json
import shutil
from pathlib import Path

import pytest

from lm import PROJECT_ROOT
from tests.conftest import TINY_RUN, run_script, run_train, write_tiny_corpus

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "legacy-3217f87"
BEST = "epoch00-val_ppl12.18.ckpt"
ONE_EPOCH_TEST_PPL = 12.06446763573396  # train.py's test of BEST at 3217f87, and its evaluate.py's
TWO_EPOCHS = {"val_ppl": 12.057064537884747, "test_ppl": 11.954263325583426}  # the run of 2 epochs there


@pytest.fixture
def legacy_run(tmp_path: Path) -> Path:
    """The fixture's run folder, where a user would have it, beside its corpus (relative paths,
    as the run was given them)."""
    write_tiny_corpus(tmp_path / "tiny")
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def test_evaluate_gives_an_old_checkpoints_test_perplexity_to_every_digit(legacy_run, tmp_path):
    result = run_script(
        "evaluate.py",
        f"ckpt_path={legacy_run / 'checkpoints' / BEST}",
        "data.dir=tiny",
        "data.cache_dir=cache",
        f"hydra.run.dir={tmp_path / 'evaluation'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())["ppl"] == ONE_EPOCH_TEST_PPL


def test_resuming_an_old_run_continues_it_exactly(legacy_run, tmp_path):
    overrides = [o for o in TINY_RUN if not o.startswith("trainer.max_epochs")]
    result = run_train(
        *overrides,
        "trainer.max_epochs=2",
        "data.dir=tiny",
        "data.cache_dir=cache",
        f"resume={legacy_run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((legacy_run / "metrics.json").read_text())
    assert {key: metrics[key] for key in TWO_EPOCHS} == TWO_EPOCHS
    assert metrics["epochs"] == 2
