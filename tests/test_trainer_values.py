"""train.py refuses, in one line naming the key and before any data is read, what Lightning's Trainer,
the callbacks and the logger would take wrongly (`enable_progress_bar='no'` as true), divide by (0
steps), or refuse with a traceback of their own; and a validation interval longer than an epoch
as soon as the corpus says how long an epoch is."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lm.data.datamodule import PTBDataModule
from lm.data.windows import variable_lengths
from lm.errors import UserError
from lm.training.command_check import check_command
from lm.training.trainer import build_trainer
from tests.conftest import TINY_RUN, compose_config, run_train
from tests.test_config_checks import refused


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.enable_progress_bar=no",
            "trainer.enable_progress_bar='no' is not allowed: it must be true, false or null.",
        ),
        ("trainer.benchmark=yes", "trainer.benchmark='yes' is not allowed: it must be true, false or null."),
        (
            "trainer.deterministic=always",
            "trainer.deterministic='always' is not allowed: it must be true, false, warn or null.",
        ),
        ("trainer.inference_mode=0", "trainer.inference_mode=0 is not allowed: it must be true or false."),
        (
            "trainer.fast_dev_run=x",
            "trainer.fast_dev_run='x' is not allowed: it must be an integer, true or false.",
        ),
        (
            "callbacks.model_checkpoint.save_last=no",
            "callbacks.model_checkpoint.save_last='no' is not allowed: it must be true, false, link or null.",
        ),
        (
            "callbacks.model_checkpoint.enable_version_counter=off",
            "callbacks.model_checkpoint.enable_version_counter='off' is not allowed: it must be true or "
            "false.",
        ),
        (
            "logger.default_hp_metric=no",
            "logger.default_hp_metric='no' is not allowed: it must be true or false.",
        ),
        (
            "callbacks.model_checkpoint.save_last=true",
            "callbacks.model_checkpoint.save_last=True would write last.ckpt at its own moments, over the "
            "one written at safe points: leave it false (a stop signal or Ctrl-C saves last.ckpt at the "
            "next safe point).",
        ),
        (
            "+callbacks.model_checkpoint.save_on_exception=true",
            "callbacks.model_checkpoint.save_on_exception=True would save wherever an exception struck, not "
            "at a safe point: leave it false (a stop signal or Ctrl-C saves last.ckpt at the next safe "
            "point).",
        ),
        (
            "trainer.log_every_n_steps=0",
            "trainer.log_every_n_steps=0 is not allowed: it must be null (50) or an integer, 1 or more.",
        ),
        (
            "trainer.accumulate_grad_batches=0",
            "trainer.accumulate_grad_batches=0 is not allowed: it must be an integer, 1 or more.",
        ),
    ],
)
def test_a_value_of_the_wrong_type_or_a_zero_divisor_is_named(override, message):
    with pytest.raises(UserError) as refusal:
        check_command(compose_config(override))
    assert message in str(refusal.value).splitlines()


def built_trainer(tmp_path: Path, *overrides: str) -> L.Trainer:
    """The Trainer train.py builds, with its callbacks and logger, writing under `tmp_path`."""
    cfg = compose_config(*overrides)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    return build_trainer(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.precision=abc",
            "trainer.precision='abc' is refused by Lightning: Precision 'abc' is invalid.",
        ),
        ("trainer.devices=0", "trainer.devices=0 is refused by Lightning: `Trainer(devices=0)` value is not"),
        (
            "trainer.gradient_clip_algorithm=abc",
            "trainer.gradient_clip_algorithm='abc' is refused by Lightning: `gradient_clip_algorithm` abc is",
        ),
        (
            "trainer.max_time=abc",
            "trainer.max_time='abc' is refused by Lightning: `Timer(duration='abc')` is",
        ),
        ("trainer.strategy=abc", "trainer.strategy='abc' is refused by Lightning: You selected an invalid"),
        # refused beside the keys before it (the logger, log_every_n_steps=50): named as the one that changed
        (
            "trainer.barebones=true",
            "trainer.barebones=True is refused by Lightning: `Trainer(barebones=True,",
        ),
        # refused beside the configured checkpoint callbacks
        (
            "trainer.enable_checkpointing=false",
            "trainer.enable_checkpointing=False is refused by Lightning: Trainer was configured with",
        ),
    ],
)
def test_what_lightning_refuses_is_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(UserError) as refusal:
        built_trainer(tmp_path, override)
    assert str(refusal.value).startswith(message) and "\n" not in str(refusal.value), str(refusal.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.accelerator=gpu",
            "trainer.accelerator='gpu' is refused by Lightning: No supported gpu backend",
        ),
        (
            "trainer.precision=abc",
            "trainer.precision='abc' is refused by Lightning: Precision 'abc' is invalid.",
        ),
    ],
)
def test_train_reports_what_lightning_refuses_in_one_line_before_any_data_is_read(
    tmp_path, override, message
):
    result = run_train(override, "data=text", "data.dir=/nonexistent", f"hydra.run.dir={tmp_path / 'run'}")
    refused(result, message)  # CUDA_VISIBLE_DEVICES="": no GPU, whatever the machine


def test_a_validation_interval_longer_than_an_epoch_is_one_line(tiny_corpus, tmp_path):
    datamodule = PTBDataModule(str(tiny_corpus), str(tmp_path / "cache"), batch_size=8, num_steps=20)
    datamodule.setup("fit")
    windows = len(datamodule.train_dataloader())  # the batches Lightning counts in an epoch
    assert datamodule.fewest_train_windows() == windows
    result = run_train(
        *TINY_RUN,
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"trainer.val_check_interval={windows + 1}",
    )
    refused(
        result,
        f"trainer.val_check_interval={windows + 1} batches is more than an epoch's {windows} training "
        f"batches: give at most {windows}, a share of the epoch (0.5: twice an epoch), or "
        "trainer.check_val_every_n_epoch=null to count the batches across epochs.",
    )
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_variable_windows_are_never_fewer_than_the_count_the_interval_is_checked_against(
    tiny_corpus, tmp_path
):
    datamodule = PTBDataModule(
        str(tiny_corpus), str(tmp_path / "cache"), batch_size=8, num_steps=20, vary_num_steps=True
    )
    targets = datamodule.corpus.splits["train"].numel() // 8 - 1
    counts = [len(variable_lengths(targets, 20, torch.Generator().manual_seed(seed))) for seed in range(200)]
    assert 0 < datamodule.fewest_train_windows() <= min(counts)
