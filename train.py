"""Train a word-level LSTM language model on PTB, then test its best checkpoint.

    python train.py                                   # Zaremba's small model, CPU or one GPU
    python train.py model=medium trainer.gpus=2       # two GPUs with DDP
    python train.py -m model=small model.dropout=0.0,0.2   # a Hydra sweep
    tensorboard --logdir outputs

Writes <run dir>/metrics.json, checkpoints/ and tensorboard/; returns the validation
perplexity so that Hydra sweepers can minimise it.
"""

import json
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lm.allocator import keep_freed_memory
from lm.callbacks import TokensPerSecond
from lm.errors import UserError
from lm.trainer import build_trainer, recover_training_state

log = logging.getLogger("train")


def train(cfg: DictConfig) -> dict:
    """Fit, test the best checkpoint, and write metrics.json (rank 0); returns the metrics."""
    started = time.perf_counter()
    keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))
    log.info(
        "%.2fM parameters; %d tokens per step (%d streams x %d steps)",
        sum(p.numel() for p in model.parameters()) / 1e6,
        cfg.data.batch_size * cfg.data.num_steps,
        cfg.data.batch_size,
        cfg.data.num_steps,
    )

    trainer.fit(model, datamodule=datamodule)
    recover_training_state(trainer)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    (test,) = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)

    throughput = next((c for c in trainer.callbacks if isinstance(c, TokensPerSecond)), None)
    val_ppl = float(
        trainer.checkpoint_callback.best_model_score if best else trainer.callback_metrics["val/ppl"]
    )
    metrics = {
        "status": "completed" if math.isfinite(val_ppl) else "diverged",
        "val_ppl": val_ppl,
        "test_ppl": test["test/ppl"],
        "test_acc": test["test/acc"],
        "epochs": trainer.fit_loop.epoch_progress.current.processed,
        "train_tokens_per_sec": throughput.tokens_per_sec if throughput else None,
        "wall_seconds": time.perf_counter() - started,
        "best_checkpoint": best,
    }
    for logger in trainer.loggers:  # the HPARAMS tab of TensorBoard: one row per run of a sweep
        logger.log_hyperparams(
            hyperparameters(cfg),
            {"hparams/val_ppl": metrics["val_ppl"], "hparams/test_ppl": metrics["test_ppl"]},
        )
        logger.finalize("success")
    if trainer.is_global_zero:
        write_metrics(metrics)
    return metrics


def hyperparameters(cfg: DictConfig) -> dict:
    """What tells runs apart: the model's options and the data, schedule and precision settings."""
    model = {f"model.{key}": value for key, value in cfg.model.items() if key != "_target_"}
    chosen = ("data.batch_size", "data.num_steps", "trainer.max_epochs", "trainer.gradient_clip_val")
    others = {key: OmegaConf.select(cfg, key) for key in (*chosen, "trainer.precision", "seed")}
    return {**model, **others}


def write_metrics(metrics: dict) -> None:
    """<run dir>/metrics.json; a perplexity that is not finite is written as null (JSON has no NaN)."""
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    path = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info(
        "%s: val ppl %s, test ppl %s; %s", metrics["status"], metrics["val_ppl"], metrics["test_ppl"], path
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """The sweepers' objective: the validation perplexity, or inf for a run that diverged or, in a
    sweep, failed, so that the sweep goes on with a bad trial instead of stopping."""
    try:
        val_ppl = train(cfg)["val_ppl"]
    except UserError as error:  # a mistake to fix before anything runs: stop, sweep or not
        log.error("%s", error)
        sys.exit(1)
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        log.exception("This run failed; the sweep goes on with val_ppl=inf for it.")
        if rank_zero_only.rank == 0:
            write_metrics(
                {
                    "status": "failed",
                    "error": f"{type(error).__name__}: {error}",
                    "val_ppl": None,
                    "test_ppl": None,
                }
            )
        return math.inf
    return val_ppl if math.isfinite(val_ppl) else math.inf


if __name__ == "__main__":
    main()
