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
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from lm.allocator import keep_freed_memory
from lm.callbacks import TokensPerSecond
from lm.errors import UserError
from lm.trainer import build_trainer, recover_training_state

log = logging.getLogger("train")
# Lightning 2.6 calls a torch API that torch 2.13 deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


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
    val_ppl = trainer.checkpoint_callback.best_model_score if best else trainer.callback_metrics["val/ppl"]
    metrics = {
        "val_ppl": float(val_ppl),
        "test_ppl": test["test/ppl"],
        "test_acc": test["test/acc"],
        "epochs": trainer.fit_loop.epoch_progress.current.processed,
        "train_tokens_per_sec": throughput.tokens_per_sec if throughput else None,
        "wall_seconds": time.perf_counter() - started,
        "best_checkpoint": best,
    }
    if trainer.is_global_zero:
        path = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("val ppl %.2f, test ppl %.2f; %s", metrics["val_ppl"], metrics["test_ppl"], path)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)["val_ppl"]
    except UserError as error:
        log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
