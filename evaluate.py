"""Exact perplexity of a trained model on a split of its corpus or on any text file.

    python evaluate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt         # PTB's test split
    python evaluate.py ckpt_path=... split=valid
    python evaluate.py ckpt_path=... data=text data.dir=PATH                          # a text corpus
    python evaluate.py ckpt_path=... file=news.txt                                    # any text file
    python evaluate.py ckpt_path=... dynamic_eval.method=sgd dynamic_eval.lr=... dynamic_eval.decay=...
    python evaluate.py ckpt_path=... cache.window=... cache.lambda=... cache.theta=...
    python evaluate.py -m ckpt_path=... split=valid cache.window=500 cache.lambda=0.05,0.1 cache.theta=0.3
    python -m lm.tools.report outputs/evaluate/multirun/<date>/<time>               # the sweep, best first
    python evaluate.py ckpt_path=... split=valid probs_file=a.valid.txt             # for lm.tools.ensemble

One stream, batch 1, the state carried over the whole text: every target scored once
(lm/evaluation/scoring.py). Test-time adaptation, off by default: dynamic evaluation
(lm/evaluation/dynamic_eval.py), the continuous cache (lm/evaluation/cache.py), or both, each
scoring a target before anything learns from it.
Prints the result and writes it, with the adaptation's options, to <run dir>/evaluation.json;
`probs_file=PATH` also writes each target's probability there (lm/evaluation/token_probs.py).
"""

import logging
import math
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lm.config  # noqa: F401 (the option nodes and resolvers that conf/ composes)
from lm.allocator import keep_freed_memory
from lm.data.datamodule import TextDataModule
from lm.data.options import DataOptions
from lm.data.text import read_text
from lm.data.vocabulary import Vocabulary
from lm.errors import UserError, exit_on_user_error
from lm.evaluation import cache, dynamic_eval
from lm.evaluation.loading import TrainedModel, load_model, pick_device
from lm.evaluation.options import EvaluateOptions
from lm.evaluation.outputs import output_file, write_whole
from lm.evaluation.scoring import score_stream, text_ids
from lm.evaluation.token_probs import probability_lines
from lm.json_output import json_text
from lm.options import build, defaults, problems, refuse

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
    refuse(
        [
            *dynamic_eval.dynamic_eval_problems(cfg.dynamic_eval),
            *cache.cache_problems(cfg.cache),
            *problems(EvaluateOptions, {key: cfg[key] for key in defaults(EvaluateOptions)}, ""),
            # data.* here too: the datamodule checks them only once the checkpoint is loaded
            *problems(
                DataOptions, {key: cfg.data[key] for key in defaults(DataOptions) if key in cfg.data}, "data"
            ),
        ]
    )
    dynamic_options = build(dynamic_eval.DynamicEvalOptions, cfg.dynamic_eval)
    cache_options = build(cache.CacheOptions, cfg.cache)
    probs_file = probs_output(cfg)
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
        ids = datamodule.corpus.splits[cfg.split].long()  # from the memory-mapped uint16 / uint32 ids
        source = {"data_dir": str(datamodule.dir), "split": cfg.split}

    if len(ids) < 2:
        what = f"file={cfg.file}" if cfg.file else f"The {cfg.split} split"
        raise UserError(f"{what} holds no token to score.")
    keep_freed_memory()  # dynamic evaluation frees megabytes of gradients every segment (lm/allocator.py)
    net = model.net
    started = time.perf_counter()
    dynamic = None
    if dynamic_options.method:
        dynamic = dynamic_evaluation(cfg, dynamic_options, net, model, datamodule, device)
    neural_cache = None
    if cache_options.window:
        neural_cache = cache.NeuralCache(
            cache_options.window, cache_options.interpolation, cache_options.theta, net.output_size, device
        )
    scores = score_stream(net, ids, device, cfg.chunk_length, dynamic, neural_cache)
    assert len(scores.log_probs) == len(ids) - 1  # every target scored once
    evaluation = {
        "ckpt_path": str(cfg.ckpt_path),
        **source,
        "ppl": scores.perplexity(),
        "acc": scores.accuracy(),
        "targets": len(ids) - 1,
        "unk_targets": int((ids[1:] == vocabulary.unk_id).sum()),
        "dynamic_eval": dynamic_options.used(),
        "cache": OmegaConf.to_container(cfg.cache) if cache_options.window else None,
        "probs_file": str(probs_file) if probs_file else None,
        "wall_seconds": time.perf_counter() - started,
    }
    path = Path(HydraConfig.get().runtime.output_dir) / "evaluation.json"
    path.write_text(json_text(evaluation))
    if probs_file:
        write_whole(probs_file, "probs_file", probability_lines(scores.log_probs))
    if not math.isfinite(evaluation["ppl"]):
        raise UserError(
            f"The perplexity is not finite ({evaluation['ppl']}; null in {path}): the adaptation diverged, "
            "or the checkpoint's weights are far too large. Lower dynamic_eval.lr, or check ckpt_path."
        )
    log.info("perplexity %.4f over %d targets; %s", evaluation["ppl"], evaluation["targets"], path)
    if probs_file:
        log.info("each target's probability, one per line: %s", probs_file)
    return evaluation


def probs_output(cfg: DictConfig) -> Path | None:
    """Where `probs_file=` puts each target's probability, checked before the model is loaded; never
    onto the checkpoint or the file being scored."""
    if not cfg.probs_file:
        return None
    reads = {Path(str(cfg.ckpt_path)).expanduser(): "the checkpoint"}
    if cfg.file:
        reads[Path(cfg.file).expanduser()] = "the file being scored"
    return output_file(str(cfg.probs_file), "probs_file", reads)


def evaluation_device(cfg: DictConfig) -> torch.device:
    """The device of the pass, by the rule of generate.py and score.py (`device`, `auto`: the
    GPU when there is one); `trainer.gpus=N`, Lightning 1.x's habit, means device=cuda."""
    name, gpus = cfg.device, cfg.trainer.gpus
    if gpus and not str(name).startswith("cuda"):
        if name != "auto":
            raise UserError(f"trainer.gpus={gpus} and device={name} conflict; give one of them.")
        if not torch.cuda.is_available():
            raise UserError(f"trainer.gpus={gpus} asks for a GPU but PyTorch sees none; drop it.")
        name = "cuda"
    return pick_device(name)


def dynamic_evaluation(
    cfg: DictConfig,
    options: dynamic_eval.DynamicEvalOptions,
    net: torch.nn.Module,
    model: TrainedModel,
    datamodule: TextDataModule | None,
    device: torch.device,
) -> dynamic_eval.DynamicEvaluation:
    """The weights' rule of `options`; `rms` first measures its statistics on the training split of
    the model's corpus."""
    mean_squares = None
    if options.method == "rms":
        train_ids = (datamodule or matching_datamodule(cfg, model.vocabulary)).corpus.splits["train"]
        started = time.perf_counter()
        mean_squares = dynamic_eval.gradient_mean_squares(
            net, train_ids, options.stats_batches, options.stats_batch_size, options.stats_num_steps, device
        )
        log.info("mean squared gradients of the training data: %.1f s", time.perf_counter() - started)
    return dynamic_eval.DynamicEvaluation(
        net, options.method, options.lr, options.decay, options.segment_length, mean_squares, options.eps
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["ppl"]


if __name__ == "__main__":
    main()
