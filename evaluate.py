"""Exact perplexity of a trained model on a split of its corpus or on any text file.

    python evaluate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt         # PTB's test split
    python evaluate.py ckpt_path=... split=valid
    python evaluate.py ckpt_path=... data=text data.dir=PATH                          # a text corpus
    python evaluate.py ckpt_path=... file=news.txt                                    # any text file
    python evaluate.py ckpt_path=... dynamic_eval.method=sgd dynamic_eval.lr=... dynamic_eval.decay=...
    python evaluate.py ckpt_path=... cache.window=... cache.lambda=... cache.theta=...

One stream, batch 1, the state carried over the whole text: every target scored once. Test-time
adaptation, off by default: dynamic evaluation (lm/dynamic_eval.py) or the continuous cache
(lm/cache.py), each scoring a target before anything learns from it. Prints the result and writes
it, with the adaptation's options, to <run dir>/evaluation.json.
"""

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lm import cache, dynamic_eval
from lm.allocator import keep_freed_memory
from lm.checkpoint import load_model, pick_device
from lm.corpus import Vocabulary, read_text
from lm.data import TextDataModule
from lm.errors import UserError, exit_on_user_error
from lm.module import LanguageModel
from lm.scoring import stream_loader, text_ids
from lm.trainer import build_trainer

log = logging.getLogger("evaluate")


def matching_datamodule(cfg: DictConfig, vocabulary: Vocabulary) -> TextDataModule:
    """The datamodule of `cfg.data`, refused unless its vocabulary is the checkpoint's."""
    datamodule = instantiate(cfg.data)
    if datamodule.vocabulary != vocabulary:
        raise UserError(
            f"The checkpoint's vocabulary ({len(vocabulary)} {vocabulary.tokenizer.level} tokens) is not "
            f"the one of data.dir={datamodule.dir} ({len(datamodule.vocabulary)}): the model was trained "
            "on other data, or with other data.level / lowercase / min_count / max_vocab. Give the "
            "training data, or score a text with file=PATH (unknown words then count as <unk>)."
        )
    return datamodule


def evaluate(cfg: DictConfig) -> dict:
    dynamic, cached = cfg.dynamic_eval, cfg.cache
    dynamic_eval.check_options(**dynamic)
    cache.check_options(**cached)
    if dynamic.method and cached.window:
        raise UserError(
            f"dynamic_eval.method={dynamic.method} and cache.window={cached.window} are both set; "
            "they are not combined: turn one off (dynamic_eval.method=null or cache.window=null)."
        )
    device = evaluation_device(cfg)
    model = load_model(cfg.ckpt_path, device)
    vocabulary = model.vocabulary
    datamodule = None
    if cfg.file:
        ids, unknown = text_ids(read_text(Path(cfg.file).expanduser()), vocabulary)
        if unknown:
            log.warning(
                "%d token types of %s are not in the vocabulary and count as <unk>, e.g. %s",
                len(unknown),
                cfg.file,
                ", ".join(unknown[:10]),
            )
        source = {"file": str(cfg.file)}
    else:
        datamodule = matching_datamodule(cfg, vocabulary)
        if cfg.split not in datamodule.corpus.splits:
            raise UserError(f"split={cfg.split} is not a split; use train, valid or test.")
        ids = datamodule.corpus.splits[cfg.split].long()  # from the memory-mapped uint16 / uint32 ids
        source = {"data_dir": str(datamodule.dir), "split": cfg.split}

    if len(ids) < 2:
        what = f"file={cfg.file}" if cfg.file else f"The {cfg.split} split"
        raise UserError(f"{what} holds no token to score.")
    start = time.perf_counter()
    if dynamic.method or cached.window:
        ppl, acc = adapted(cfg, model, ids, datamodule, device)
    else:
        overrides = {"enable_checkpointing": False, "enable_progress_bar": False, **lightning_device(device)}
        trainer = build_trainer(OmegaConf.merge(cfg.trainer, overrides), logger=False)
        (result,) = trainer.test(model, dataloaders=stream_loader(ids, cfg.num_steps), verbose=False)
        ppl, acc = result["test/ppl"], result["test/acc"]
    dynamic_options = None
    if dynamic.method:  # the options the method used
        dynamic_options = OmegaConf.to_container(dynamic)
        if dynamic.method == "sgd":
            dynamic_options = {k: v for k, v in dynamic_options.items() if k not in dynamic_eval.RMS_OPTIONS}
    evaluation = {
        "ckpt_path": str(cfg.ckpt_path),
        **source,
        "ppl": ppl,
        "acc": acc,
        "targets": len(ids) - 1,
        "unk_targets": int((ids[1:] == vocabulary.unk_id).sum()),
        "dynamic_eval": dynamic_options,
        "cache": OmegaConf.to_container(cached) if cached.window else None,
        "wall_seconds": time.perf_counter() - start,
    }
    path = Path(HydraConfig.get().runtime.output_dir) / "evaluation.json"
    path.write_text(json.dumps(evaluation, indent=2) + "\n")
    log.info("perplexity %.4f over %d targets; %s", evaluation["ppl"], evaluation["targets"], path)
    return evaluation


def evaluation_device(cfg: DictConfig) -> torch.device:
    """The device of every pass, by the rule of generate.py and score.py (`device`, `auto`: the
    GPU when there is one); `trainer.gpus=N`, Lightning 1.x's habit, means device=cuda."""
    name, gpus = cfg.device, cfg.trainer.gpus
    if gpus and not str(name).startswith("cuda"):
        if name != "auto":
            raise UserError(f"trainer.gpus={gpus} and device={name} conflict; give one of them.")
        if not torch.cuda.is_available():
            raise UserError(f"trainer.gpus={gpus} asks for a GPU but PyTorch sees none; drop it.")
        name = "cuda"
    return pick_device(name)


def lightning_device(device: torch.device) -> dict:
    """Trainer arguments for the plain pass on `device`: one process, as the batch-1 pass is one
    stream (several GPUs would each score all of it)."""
    if device.type == "cpu":
        return {"accelerator": "cpu", "devices": 1, "gpus": None}
    return {"accelerator": "gpu", "devices": [device.index or 0], "gpus": None}


def adapted(
    cfg: DictConfig,
    model: LanguageModel,
    ids: torch.Tensor,
    datamodule: TextDataModule | None,
    device: torch.device,
) -> tuple[float, float]:
    """Perplexity and accuracy with dynamic evaluation or the cache.

    A plain loop rather than Lightning's `trainer.test`: dynamic evaluation takes gradients and
    changes the weights in the middle of evaluation, which the test loop (under inference mode)
    does not allow; the cache, which reads the network's last-layer outputs rather than the
    LightningModule's test step, runs in a loop of the same kind.
    """
    keep_freed_memory()  # dynamic evaluation frees megabytes of gradients every segment (lm/allocator.py)
    net = model.net.to(device).eval()
    dynamic, cached = cfg.dynamic_eval, cfg.cache
    if cached.window:
        log_probs, correct = cache.cache_log_probs(
            net, ids, cached.window, cached["lambda"], cached.theta, cfg.num_steps, device
        )
    else:
        mean_squares = None
        if dynamic.method == "rms":
            train_ids = (datamodule or matching_datamodule(cfg, model.vocabulary)).corpus.splits["train"]
            started = time.perf_counter()
            mean_squares = dynamic_eval.gradient_mean_squares(
                net,
                train_ids,
                dynamic.stats_batches,
                dynamic.stats_batch_size,
                dynamic.stats_num_steps,
                device,
            )
            log.info("mean squared gradients of the training data: %.1f s", time.perf_counter() - started)
        log_probs, correct = dynamic_eval.dynamic_log_probs(
            net,
            ids,
            dynamic.method,
            dynamic.lr,
            dynamic.decay,
            dynamic.num_steps,
            device,
            mean_squares,
            dynamic.eps,
        )
    assert len(log_probs) == len(ids) - 1  # every target scored once
    return torch.exp(-log_probs.sum() / len(log_probs)).item(), correct.double().mean().item()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["ppl"]


if __name__ == "__main__":
    main()
