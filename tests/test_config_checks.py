"""train.py refuses a bad run option, an unwritable token cache and a split of blank lines in one line."""

from pathlib import Path

import pytest

from lm.errors import UserError
from lm.training.command_check import check_command
from tests.conftest import TINY_RUN, compose_config, random_lines, run_train, write_corpus


def refused(result, message: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.max_epochs=-2",
            "trainer.max_epochs=-2 is not allowed: it must be an integer, 0 or more, -1",
        ),
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc' is not allowed"),
        ("trainer.max_steps=2.5", "trainer.max_steps=2.5 is not allowed: it must be an integer, 0 or more"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 is not allowed: it must be null or a"),
        ("seed=1.5", "seed=1.5 is not allowed: it must be an integer in [0, 4294967295]."),
        ("seed=-1", "seed=-1 is not allowed"),
        (
            "trainer.limit_train_batches=1.5",
            "trainer.limit_train_batches=1.5 is not allowed: it must be null,",
        ),
        ("trainer.limit_val_batches=-1", "trainer.limit_val_batches=-1 is not allowed"),
        ("trainer.limit_test_batches=all", "trainer.limit_test_batches='all' is not allowed"),
        ("trainer.limit_predict_batches=2.0", "trainer.limit_predict_batches=2.0 is not allowed"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0 is not allowed"),
        ("trainer.val_check_interval=0.0", "trainer.val_check_interval=0.0 is not allowed"),
    ],
)
def test_a_bad_run_option_is_named_with_what_is_allowed(override, message):
    with pytest.raises(UserError) as refusal:
        check_command(compose_config(override))
    assert message in str(refusal.value)


def test_train_checks_the_run_options_before_any_data_is_read(tmp_path):
    result = run_train(
        "trainer.gradient_clip_val=-1", f"hydra.run.dir={tmp_path / 'run'}", "data.dir=/nonexistent"
    )
    refused(result, "trainer.gradient_clip_val=-1 is not allowed: it must be null or a")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_command_with_several_bad_options_names_them_all_before_any_data_is_read(tmp_path):
    result = run_train(
        "model.net.hidden_size=0",
        "model.lr=-1",
        "data.min_count=0",
        "overwrite=no",
        "trainer.gradient_clip_val=-1",
        "trainer.enable_progress_bar=no",
        "callbacks.model_checkpoint.save_last=no",
        f"hydra.run.dir={tmp_path / 'run'}",
        "data.dir=/nonexistent",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for line in (
        "model.net.hidden_size=0 is not allowed: it must be an integer, 1 or more.",
        "model.lr=-1 is not allowed: it must be a number, 0 or more.",
        "data.min_count=0 is not allowed: it must be an integer, 1 or more.",
        "overwrite='no' is not allowed: it must be true or false.",
        "trainer.gradient_clip_val=-1 is not allowed: it must be null or a number, 0 or more",
        "trainer.enable_progress_bar='no' is not allowed: it must be true, false or null.",
        "callbacks.model_checkpoint.save_last='no' is not allowed: it must be true, false, link or null.",
    ):
        assert line in result.stdout, result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.max_epochs=-1", "trainer.max_steps=100", "trainer.gradient_clip_val=null"],
        ["trainer.max_epochs=0", "trainer.max_steps=0", "trainer.gradient_clip_val=0"],
        ["trainer.max_epochs=null", "trainer.limit_train_batches=0.5", "trainer.limit_val_batches=3"],
        [
            "trainer.limit_test_batches=1.0",
            "trainer.limit_predict_batches=0",
            "trainer.val_check_interval=1.0",
        ],
        ["trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=10", "seed=4294967295"],
        ["trainer.deterministic=warn", "trainer.fast_dev_run=2", "callbacks.model_checkpoint.save_last=null"],
        ["trainer.enable_progress_bar=false", "trainer.benchmark=null", "logger.default_hp_metric=true"],
        ["trainer.log_every_n_steps=null", "trainer.accumulate_grad_batches=4", "~callbacks.progress_bar"],
    ],
)
def test_what_lightning_accepts_passes(overrides):
    check_command(compose_config(*overrides))


def tiny_run(tmp_path: Path, corpus: Path, *overrides: str):
    return run_train(*TINY_RUN, f"data.dir={corpus}", f"hydra.run.dir={tmp_path / 'run'}", *overrides)


def test_a_token_cache_folder_that_cannot_be_written_is_one_line(tiny_corpus, tmp_path):
    blocker = tmp_path / "a-file"  # root writes into a chmod-ed folder, but never under a file
    blocker.write_text("")
    result = tiny_run(tmp_path, tiny_corpus, f"data.cache_dir={blocker / 'cache'}")
    refused(
        result,
        f"data.cache_dir={blocker / 'cache'} cannot hold the token cache ({blocker} is a file, not a "
        "folder): set data.cache_dir=PATH to a folder you can write.",
    )


@pytest.mark.parametrize("layout", ["ptb", "text"])
def test_a_split_of_blank_lines_only_is_refused(layout, tmp_path):
    lines = {"train": random_lines(500, 0), "valid": ["", "  ", ""] * 50, "test": random_lines(50, 2)}
    corpus = tmp_path / "corpus"
    if layout == "ptb":
        write_corpus(corpus, lines)
        name, data = "ptb.valid.txt", []
    else:
        corpus.mkdir()
        for split, split_lines in lines.items():
            (corpus / f"{split}.txt").write_text("".join(f"{line}\n" for line in split_lines))
        name, data = "valid.txt", ["data=text"]
    result = tiny_run(tmp_path, corpus, *data, f"data.cache_dir={tmp_path / 'cache'}")
    refused(result, f"The valid split ({name} in data.dir={corpus}) holds only blank lines: no word to")
