"""Exact perplexity of a trained model on a split of its corpus or on any text file.

    python evaluate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt         # PTB's test split
    python evaluate.py ckpt_path=... split=valid
    python evaluate.py ckpt_path=... data=text data.dir=PATH                          # a text corpus
    python evaluate.py ckpt_path=... file=news.txt                                    # any text file

One stream, batch 1, the state carried over the whole text: every target scored once. Prints the
result and writes it to <run dir>/evaluation.json.
"""

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lm.checkpoint import load_model
from lm.corpus import read_text
from lm.errors import UserError, exit_on_user_error
from lm.scoring import stream_loader, text_ids
from lm.trainer import build_trainer

log = logging.getLogger("evaluate")


def evaluate(cfg: DictConfig) -> dict:
    model = load_model(cfg.ckpt_path)
    vocabulary = model.vocabulary
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
        datamodule = instantiate(cfg.data)
        if datamodule.vocabulary != vocabulary:
            raise UserError(
                f"The checkpoint's vocabulary ({len(vocabulary)} {vocabulary.tokenizer.level} tokens) is not "
                f"the one of data.dir={datamodule.dir} ({len(datamodule.vocabulary)}): the model was trained "
                "on other data, or with other data.level / lowercase / min_count / max_vocab. Give the "
                "training data, or score a text with file=PATH (unknown words then count as <unk>)."
            )
        if cfg.split not in datamodule.corpus.splits:
            raise UserError(f"split={cfg.split} is not a split; use train, valid or test.")
        ids = datamodule.corpus.splits[cfg.split]
        source = {"data_dir": str(datamodule.dir), "split": cfg.split}

    if len(ids) < 2:
        raise UserError(f"{cfg.file or f'The {cfg.split} split'} holds no token to score.")
    # One process: the batch-1 pass is one stream (several GPUs would each score all of it).
    overrides = {"enable_checkpointing": False, "enable_progress_bar": False, "devices": 1}
    if cfg.trainer.gpus:
        overrides["gpus"] = 1
    trainer = build_trainer(OmegaConf.merge(cfg.trainer, overrides), logger=False)
    (result,) = trainer.test(model, dataloaders=stream_loader(ids, cfg.num_steps), verbose=False)
    evaluation = {
        "ckpt_path": str(cfg.ckpt_path),
        **source,
        "ppl": result["test/ppl"],
        "acc": result["test/acc"],
        "targets": len(ids) - 1,
        "unk_targets": int((ids[1:] == vocabulary.unk_id).sum()),
    }
    path = Path(HydraConfig.get().runtime.output_dir) / "evaluation.json"
    path.write_text(json.dumps(evaluation, indent=2) + "\n")
    log.info("perplexity %.4f over %d targets; %s", evaluation["ppl"], evaluation["targets"], path)
    return evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["ppl"]


if __name__ == "__main__":
    main()
