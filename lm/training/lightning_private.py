"""The private Lightning names the project needs, in one place (Lightning 2.6).

Each answers a question Lightning's public API does not; tests/test_lightning_private.py fails,
naming the function here, when a Lightning release moves one.
"""

import lightning as L

# The launcher that starts ranks 1.. by running the command line again (Lightning's `ddp`).
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher


def relaunches_the_command_line(trainer: L.Trainer) -> bool:
    """Whether `ddp` will start the other processes by running this command line again."""
    return isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.world_size > 1


def step_is_followed_by_more_than_a_step(trainer: L.Trainer) -> bool:
    """Whether, after the training step that just ended, Lightning will validate, end the epoch or
    stop training, or accumulates gradients still (they are in no checkpoint): the loop's own answers,
    so that a checkpoint taken here does not resume past a validation that never ran."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return (
        epoch_loop.batch_progress.is_last_batch
        or epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        or epoch_loop._is_training_done
        or epoch_loop._should_accumulate()
    )


def write_step_logs(trainer: L.Trainer) -> None:
    """Write this step's logged values now: Lightning writes them after the batch-end hooks, which
    a stop at that point skips."""
    trainer._logger_connector.update_train_step_metrics()


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer a module is attached to, or None: the public `module.trainer` raises without one
    (a module built to be saved or loaded outside a run)."""
    return module._trainer
