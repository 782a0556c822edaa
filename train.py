"""Train a word-level LSTM language model on PTB, then test its best checkpoint.

    python train.py                                   # Zaremba's small model, CPU or one GPU
    python train.py model=medium trainer.gpus=2       # two GPUs with DDP
    python train.py -m model=small model.net.dropout=0.0,0.2   # a Hydra sweep
    tensorboard --logdir outputs

Writes <run dir>/metrics.json, checkpoints/ and tensorboard/; returns the validation
perplexity so that Hydra sweepers can minimise it.
"""

import logging
import math
import signal
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import lm.config  # noqa: F401 (the option nodes and resolvers that conf/ composes)
from lm.allocator import keep_freed_memory
from lm.errors import exit_on_user_error, user_error_in
from lm.json_output import json_text
from lm.options import dotted, is_setting
from lm.training.command_check import check_command
from lm.training.continuation import continue_commands, finished_sweep_run, shell_word
from lm.training.module import Diverged
from lm.training.run_folder import prepare_run_folder
from lm.training.safe_stop import Interrupted, TrainingCheckpoint, fit_until_stopped
from lm.training.throughput import TokensPerSecond
from lm.training.trainer import build_trainer, check_validation_interval

log = logging.getLogger("train")


def train(cfg: DictConfig) -> dict:
    """Fit, test the best checkpoint, and write metrics.json (rank 0); returns the metrics."""
    started = time.perf_counter()
    keep_freed_memory()
    check_command(cfg)  # every problem at once, before the data is read or downloaded
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    finished = finished_sweep_run(cfg, run_dir)
    if finished is not None:  # continue_sweep=true: a run this sweep had finished is kept as it is
        return finished
    resume_from = prepare_run_folder(cfg, run_dir)
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]  # the run's clock starts
    L.seed_everything(cfg.seed, workers=True)
    # Before the data (it needs none): what Lightning refuses is one line before anything is read.
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)  # checked when resuming
    datamodule.check_divides(trainer.world_size)  # here too: ddp_spawn's workers cannot report it as one line
    check_validation_interval(trainer, datamodule.fewest_train_windows(), datamodule.options.vary_num_steps)
    log.info(
        "%.2fM parameters; %d tokens per step (%d streams x %d steps)%s",
        sum(p.numel() for p in model.parameters()) / 1e6,
        cfg.data.batch_size * cfg.data.num_steps,
        cfg.data.batch_size,
        cfg.data.num_steps,
        f"; resuming from {resume_from}" if resume_from else "",
    )

    checkpointing = next((c for c in trainer.callbacks if isinstance(c, TrainingCheckpoint)), None)
    try:
        stopped = fit_until_stopped(trainer, model, datamodule, resume_from)
    except Diverged as stop:
        last = str(checkpointing.last_path) if checkpointing and checkpointing.last_path.exists() else ""
        log.error(
            "Training diverged: %s. The last good checkpoint is %s. Lower model.lr or "
            "trainer.gradient_clip_val, or look at the data.",
            stop,
            last or "none (no epoch had ended)",
        )
        metrics = {"status": "diverged", "error": str(stop), "step": stop.step, "lr": stop.lr}
        if trainer.is_global_zero:
            write_metrics({**metrics, "val_ppl": None, "test_ppl": None, "last_good_checkpoint": last})
        return {**metrics, "val_ppl": math.inf}
    except Interrupted as stop:
        log.warning("Interrupted by %s.", stop)
        if checkpointing.last_path.is_file():
            _print_continue_commands(run_dir)
        return {"status": "interrupted", "val_ppl": math.inf}
    if stopped:
        log.warning("Stopped by %s.", stopped)
        _print_continue_commands(run_dir)
        return {"status": "preempted", "val_ppl": math.inf}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        val_ppl = float(trainer.checkpoint_callback.best_model_score)
    elif "val/ppl" in trainer.callback_metrics:  # validated, but no checkpoint callback kept the best
        val_ppl = float(trainer.callback_metrics["val/ppl"])
    else:
        val_ppl = None
        log.warning(
            "No validation ran (trainer.limit_val_batches, check_val_every_n_epoch, val_check_interval or "
            "max_steps): val_ppl is null, and the test uses the last weights."
        )
    try:
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    except SystemExit:  # Lightning's end on a KeyboardInterrupt: a second Ctrl-C during the test
        if not (checkpointing and checkpointing.interrupted):
            raise
        log.warning(
            "Interrupted by a second Ctrl-C during the final test: training is complete and its "
            "checkpoints are intact; test the best one with evaluate.py ckpt_path=%s",
            best or checkpointing.last_path,
        )
        return {"status": "interrupted", "val_ppl": math.inf}
    test = results[0] if results else {}  # none with trainer.limit_test_batches=0
    if checkpointing and checkpointing.signal is not None:
        log.warning(
            "%s arrived after the last training step: the test was finished and metrics.json written; "
            "the run is complete.",
            signal.Signals(checkpointing.signal).name,
        )

    throughput = next((c for c in trainer.callbacks if isinstance(c, TokensPerSecond)), None)
    metrics = {
        "status": "completed" if val_ppl is None or math.isfinite(val_ppl) else "diverged",
        "val_ppl": val_ppl,
        "test_ppl": test.get("test/ppl"),
        "test_acc": test.get("test/acc"),
        "epochs": trainer.fit_loop.epoch_progress.current.processed,
        "train_tokens_per_sec": throughput.tokens_per_sec if throughput else None,
        "wall_seconds": checkpointing.wall_seconds if checkpointing else time.perf_counter() - started,
        "best_checkpoint": best,
    }
    for logger in trainer.loggers:  # the HPARAMS tab of TensorBoard: one row per run of a sweep
        logger.log_hyperparams(
            hyperparameters(cfg),
            {  # NaN for what was not measured: TensorBoard takes no null
                f"hparams/{key}": math.nan if metrics[key] is None else metrics[key]
                for key in ("val_ppl", "test_ppl")
            },
        )
        logger.finalize("success")
    if trainer.is_global_zero:
        write_metrics(metrics)
    return metrics


def _print_continue_commands(run_dir: Path) -> None:
    """The commands that go on, each on its line as it runs when pasted into a shell."""
    for what, arguments in continue_commands(run_dir):
        log.warning("%s: python train.py %s", what, " ".join(map(shell_word, arguments)))


def hyperparameters(cfg: DictConfig) -> dict:
    """What tells runs apart, by dotted key: the network's, the training's and the data's options (not
    paths, nor Hydra's keys), the schedule, the precision and the seed."""
    model = dotted(OmegaConf.to_container(cfg.model, resolve=True), "model.")
    data = dotted(OmegaConf.to_container(cfg.data, resolve=True), "data.")
    chosen = ("trainer.max_epochs", "trainer.gradient_clip_val", "trainer.precision", "seed")
    return {
        **{key: value for key, value in {**model, **data}.items() if is_setting(key)},
        **{key: OmegaConf.select(cfg, key) for key in chosen},
    }


def write_metrics(metrics: dict) -> None:
    """<run dir>/metrics.json, replaced at once (a reader never sees half of it); a perplexity
    that is not finite is written as null (JSON has no NaN)."""
    path = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json_text(metrics))
    partial.replace(path)
    log.info(
        "%s: val ppl %s, test ppl %s; %s", metrics["status"], metrics["val_ppl"], metrics["test_ppl"], path
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """The sweepers' objective: the validation perplexity, or inf for a run that diverged or, in a
    one-process sweep run, failed, so that the sweep goes on with a bad trial instead of stopping.
    A UserError (a mistake to fix before anything runs) stops the sweep, as does a failure of one
    process of several (its peers would wait for it forever)."""
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics = train(cfg)
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops at a safe point): one line
        log.error("Interrupted by Ctrl-C before training began or after it ended: nothing to save.")
        sys.exit(130)
    except Exception as error:
        several_processes = torch.distributed.is_available() and torch.distributed.is_initialized()
        if user_error_in(error) or not sweep or several_processes:
            raise
        log.exception("This run failed; the sweep goes on with val_ppl=inf for it.")
        if rank_zero_only.rank == 0:
            failure = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            write_metrics({**failure, "val_ppl": None, "test_ppl": None})
        return math.inf
    if metrics["status"] == "preempted":  # a single run ends cleanly; a sweep is cut short
        sys.exit(1 if sweep else 0)
    if metrics["status"] == "interrupted":
        sys.exit(1)
    if metrics["status"] == "diverged" and not sweep:
        sys.exit(1)
    val_ppl = metrics["val_ppl"]
    return val_ppl if val_ppl is not None and math.isfinite(val_ppl) else math.inf


if __name__ == "__main__":
    main()
