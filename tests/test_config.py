"""The composed configuration: presets as docs/design.md's table and as results/ recorded them, every
Trainer argument, trainer.gpus."""

import inspect

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from lm import PROJECT_ROOT
from lm.errors import UserError
from lm.options import dotted, is_setting
from lm.training.checkpoint_file import run_config_now
from lm.training.trainer import trainer_arguments
from tests.conftest import compose_config

# docs/design.md's preset table: layers, hidden, num_steps, init, dropout, epochs, decay after, decay, clip
TABLE = {
    "small": (2, 200, 20, 0.1, 0.0, 13, 4, 0.5, 5),
    "medium": (2, 650, 35, 0.05, 0.5, 39, 6, 1 / 1.2, 5),
    "large": (2, 1500, 35, 0.04, 0.65, 55, 14, 1 / 1.15, 10),
}


@pytest.mark.parametrize("preset", TABLE)
def test_presets_compose_to_the_papers_values(preset):
    cfg = compose_config(f"model={preset}")
    layers, hidden, num_steps, init, dropout, epochs, decay_after, decay, clip = TABLE[preset]
    assert (cfg.model.net.num_layers, cfg.model.net.hidden_size, cfg.data.num_steps) == (
        layers,
        hidden,
        num_steps,
    )
    assert (cfg.model.net.init_scale, cfg.model.net.dropout, cfg.trainer.max_epochs) == (
        init,
        dropout,
        epochs,
    )
    assert (cfg.model.decay_after, cfg.model.lr_decay) == (decay_after, decay)
    assert cfg.trainer.gradient_clip_val == clip
    assert (cfg.data.batch_size, cfg.model.lr, cfg.model.net.tie_weights) == (20, 1.0, False)
    assert (cfg.data.eval_batch_size, cfg.data.test_batch_size) == (20, 1)


# The README's results rows: each results/ folder's config, and the command that the README says made it.
RECORDED_RUNS = {
    "ptb-small": ["model=small"],
    "ptb-awd-cpu": ["model=awd_cpu"],
    "ptb-awd-cpu-xeon": ["model=awd_cpu"],
    "ptb-mogrifier-cpu": ["model=mogrifier_cpu"],
    "ptb-xlstm-cpu": ["model=xlstm_cpu"],
    "ptb-small-adaptive": [
        "model=small",
        "model.net.softmax=adaptive",
        "model.net.cutoffs=[6000]",
        "model.net.div_value=16",
    ],
}


@pytest.mark.parametrize("folder", RECORDED_RUNS)
def test_the_readme_commands_compose_to_the_recorded_runs_settings(folder):
    """`python train.py model=awd_cpu` must train what results/ptb-awd-cpu recorded: a preset
    edited without a new run would make the README's figures unreproducible."""
    recorded = OmegaConf.load(PROJECT_ROOT / "results" / folder / "config.yaml")
    cfg = compose_config(*RECORDED_RUNS[folder])
    # The recorded model options in today's layout (the network's under model.net); Hydra's keys
    # (`_target_`: where the code lives) are not settings, and options added since keep their defaults.
    then = settings(run_config_now(OmegaConf.to_container(recorded))["model"])
    now = settings(OmegaConf.to_container(cfg.model))
    assert {key: now.get(key) for key in then} == then
    training = ["batch_size", "num_steps", "vary_num_steps", "test_batch_size", "test_num_steps"]
    assert {k: cfg.data.get(k, False) for k in training} == {k: recorded.data.get(k, False) for k in training}
    for key in ("max_epochs", "gradient_clip_val", "gradient_clip_algorithm", "precision"):
        assert cfg.trainer[key] == recorded.trainer[key], key
    assert cfg.seed == recorded.seed


def settings(node: dict) -> dict:
    """A config node's settings by their dotted keys (no paths, no Hydra keys)."""
    return {key: value for key, value in dotted(node).items() if is_setting(key)}


def test_the_default_is_the_small_preset():
    assert compose_config().model == compose_config("model=small").model


def test_every_trainer_argument_can_be_overridden():
    # conf/trainer/default.yaml mirrors Lightning 2.6's Trainer. Each of its keys must be an argument
    # of the installed Trainer, or every run fails; an argument that a later 2.x adds is left out
    # until the YAML lists it (+trainer.<name>=value sets it meanwhile), so only 2.6 needs them all.
    arguments = set(inspect.signature(L.Trainer).parameters) - {"logger", "callbacks"}
    mirrored = set(compose_config().trainer) - {"gpus"}
    assert mirrored <= arguments, mirrored - arguments
    if L.__version__.split(".")[:2] == ["2", "6"]:
        assert mirrored == arguments, arguments - mirrored
    assert compose_config("trainer.max_steps=7").trainer.max_steps == 7


def test_gpus_means_gpu_devices(monkeypatch):
    trainer = compose_config("trainer.gpus=2").trainer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    arguments = trainer_arguments(trainer)
    assert (arguments["accelerator"], arguments["devices"], arguments["strategy"]) == ("gpu", 2, "auto")
    assert "gpus" not in arguments  # Lightning 2 would reject it


def test_gpus_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"trainer.gpus=2 asks for GPUs but PyTorch sees none"):
        trainer_arguments(compose_config("trainer.gpus=2").trainer)


def test_no_gpus_leaves_the_trainer_arguments_alone():
    trainer = compose_config("trainer.gpus=0").trainer
    expected = OmegaConf.to_container(trainer, resolve=True)
    del expected["gpus"]
    assert trainer_arguments(trainer) == expected
