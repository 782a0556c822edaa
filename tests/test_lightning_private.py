"""The private Lightning names lm/training/lightning_private.py uses: where they are, and what they answer.

A Lightning release may move or rename any of them; each test then names the function there to
fix. lm.training.lightning_private is imported inside the tests: a missing name fails its own test
here rather than the collection of the whole file.
"""

import inspect

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

PRIVATE = "lm/training/lightning_private.py"
FOLLOWED = "step_is_followed_by_more_than_a_step"


def moved(name: str, function: str) -> str:
    return (
        f"Lightning {L.__version__} has no {name}, which {function}() in {PRIVATE} uses: "
        "find where this release moved it, or what replaced it, and change that function."
    )


def plain_trainer(**arguments) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **arguments
    )


def test_the_launcher_that_reruns_the_command_line_is_where_lightning_private_imports_it():
    from lightning.pytorch.strategies import launchers

    launcher = getattr(launchers, "_SubprocessScriptLauncher", None)
    assert inspect.isclass(launcher), moved(
        "lightning.pytorch.strategies.launchers._SubprocessScriptLauncher", "relaunches_the_command_line"
    )


def is_property(owner: type, name: str) -> bool:
    return isinstance(inspect.getattr_static(owner, name, None), property)


def is_method(owner: type, name: str) -> bool:
    return callable(inspect.getattr_static(owner, name, None))


# What each function reads of a freshly built Trainer: (the name, the function, whether it is there).
TRAINER_NAMES = [
    ("Trainer.fit_loop._data_fetcher", FOLLOWED, lambda trainer: hasattr(trainer.fit_loop, "_data_fetcher")),
    (
        "Trainer.fit_loop.epoch_loop.batch_progress.is_last_batch",
        FOLLOWED,
        lambda trainer: hasattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch"),
    ),
    (
        "Trainer.fit_loop.epoch_loop._should_check_val_fx()",
        FOLLOWED,
        lambda trainer: is_method(type(trainer.fit_loop.epoch_loop), "_should_check_val_fx"),
    ),
    (
        "Trainer.fit_loop.epoch_loop._is_training_done (a property)",
        FOLLOWED,
        lambda trainer: is_property(type(trainer.fit_loop.epoch_loop), "_is_training_done"),
    ),
    (
        "Trainer.fit_loop.epoch_loop._should_accumulate()",
        FOLLOWED,
        lambda trainer: is_method(type(trainer.fit_loop.epoch_loop), "_should_accumulate"),
    ),
    (
        "Trainer._logger_connector.update_train_step_metrics()",
        "write_step_logs",
        lambda trainer: callable(
            getattr(getattr(trainer, "_logger_connector", None), "update_train_step_metrics", None)
        ),
    ),
]


@pytest.mark.parametrize(
    ("name", "function", "present"), TRAINER_NAMES, ids=[row[0] for row in TRAINER_NAMES]
)
def test_the_trainer_still_has(name, function, present):
    assert present(plain_trainer()), moved(name, function)


# What the functions answer, in a real fit of a tiny model on the CPU.


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.log("seen", float(batch_idx))  # which batch the logged values are of
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Validated(Tiny):
    def validation_step(self, batch, batch_idx) -> None:
        self.layer(batch[0])


def batches(count: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(count, 2)), batch_size=1)


class Answers(L.Callback):
    """What step_is_followed_by_more_than_a_step says after each training step, and where the
    validations come."""

    def __init__(self) -> None:
        self.events: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lm.training.lightning_private import step_is_followed_by_more_than_a_step

        self.events.append(step_is_followed_by_more_than_a_step(trainer))

    def on_validation_start(self, trainer, pl_module) -> None:
        self.events.append("validation")


def fit_answers(tmp_path, train_batches: int, validate: bool = False, **arguments) -> list:
    answers = Answers()
    trainer = plain_trainer(
        default_root_dir=tmp_path,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=[answers],
        **arguments,
    )
    if validate:
        trainer.fit(Validated(), batches(train_batches), batches(2))
    else:
        trainer.fit(Tiny(), batches(train_batches))
    return answers.events


T, F, V = True, False, "validation"

CASES = {
    # name: (training batches, validation?, Trainer arguments, the answers after each step)
    "the last batch of each epoch": (4, False, {"max_epochs": 2}, [F, F, F, T] * 2),
    "a validation every 2 batches": (
        5,
        True,
        {"max_epochs": 1, "val_check_interval": 2},
        [F, T, V, F, T, V, T],
    ),
    "gradients accumulated over 2 batches": (
        4,
        False,
        {"max_epochs": 1, "accumulate_grad_batches": 2},
        [T, F, T, T],
    ),
    "the last step of max_steps, mid-epoch": (5, False, {"max_steps": 3}, [F, F, T]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_step_is_followed_by_more_than_a_step_exactly_where_lightning_does_more(tmp_path, case):
    train_batches, validate, arguments, expected = CASES[case]
    events = fit_answers(tmp_path, train_batches, validate, **arguments)
    assert events == expected, (
        f"{FOLLOWED}() in {PRIVATE} answers {events} after the steps of a fit with {arguments} "
        f"(validation={validate}), not {expected}: Lightning {L.__version__} decides differently when to "
        "validate, end the epoch or stop, or accumulate; read its training epoch loop again."
    )


class Written(Logger):
    """The metrics each call of log_metrics writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[dict] = []

    @property
    def name(self) -> str:
        return "written"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.written.append(dict(metrics))


class WriteAtBatch(L.Callback):
    def __init__(self, logger: Written, batch: int) -> None:
        self.logger, self.batch = logger, batch
        self.written_now: list[dict] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lm.training.lightning_private import write_step_logs

        if batch_idx == self.batch:
            before = len(self.logger.written)
            write_step_logs(trainer)
            self.written_now = self.logger.written[before:]


def test_write_step_logs_writes_the_values_of_the_step_that_just_ended(tmp_path):
    logger = Written()
    writer = WriteAtBatch(logger, batch=1)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        max_epochs=1,
        callbacks=[writer],
    )
    trainer.fit(Tiny(), batches(3))
    assert writer.written_now is not None, "the callback never ran"
    assert [metrics.get("seen") for metrics in writer.written_now] == [1.0], (
        f"write_step_logs() in {PRIVATE}, called at the end of batch 1, wrote {writer.written_now}, not that "
        f"batch's logged values: Lightning {L.__version__} writes a step's logs some other way."
    )


def cpu_trainer(**arguments) -> L.Trainer:
    # LightningEnvironment: no SLURM or torchelastic of the machine running the tests is detected.
    return plain_trainer(plugins=[LightningEnvironment()], **arguments)


def test_a_single_cpu_process_is_not_relaunched():
    from lm.training.lightning_private import relaunches_the_command_line

    assert not relaunches_the_command_line(cpu_trainer(devices=1))


@pytest.mark.parametrize(
    ("strategy", "devices", "relaunches"), [("ddp", 2, True), ("ddp", 1, False), ("ddp_spawn", 2, False)]
)
def test_only_ddp_on_several_processes_relaunches_the_command_line(strategy, devices, relaunches):
    from lm.training.lightning_private import relaunches_the_command_line

    trainer = cpu_trainer(devices=devices, strategy=strategy)  # built, not fitted: nothing is started
    assert relaunches_the_command_line(trainer) is relaunches, (
        f"relaunches_the_command_line() in {PRIVATE} says {not relaunches} for strategy={strategy} on "
        f"{devices} process(es): Lightning {L.__version__}'s {type(trainer.strategy.launcher).__name__} is "
        "not the launcher it looks for, or no longer starts the other processes that way."
    )


def test_attached_trainer_is_none_without_a_trainer_and_the_trainer_once_fitting():
    from lm.training.lightning_private import attached_trainer

    module = L.LightningModule()
    assert attached_trainer(module) is None, (
        "lightning_private.attached_trainer: LightningModule._trainer moved"
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    module.trainer = trainer
    assert attached_trainer(module) is trainer
