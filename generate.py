"""Sample continuations of a prompt from a trained model.

    python generate.py ckpt_path=PATH prompt="the company said" num_words=50 temperature=0.8 top_k=40 seed=1
    python generate.py ckpt_path=PATH prompt="the" num_samples=5 temperature=0      # greedy

The prompt is read after an `<eos>`, as a sentence start; `<eos>` prints as a line break. Prints
the samples and writes them to <run dir>/samples.txt.
"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lm.config  # noqa: F401 (the option nodes and resolvers that conf/ composes)
from lm.api import LanguageModel
from lm.errors import exit_on_user_error
from lm.evaluation.loading import pick_device
from lm.evaluation.options import SamplingOptions
from lm.options import defaults, problems, refuse

log = logging.getLogger("generate")


def generate(cfg: DictConfig) -> list[str]:
    refuse(problems(SamplingOptions, {key: cfg[key] for key in defaults(SamplingOptions)}, ""))
    device = pick_device(cfg.device)
    model = LanguageModel.load(cfg.ckpt_path, device)
    prompt = str(cfg.prompt)
    unknown = model.vocabulary.unknown(model.vocabulary.tokenizer.tokens(prompt))
    if unknown:
        log.warning("Not in the model's vocabulary, read as <unk>: %s", ", ".join(unknown))
    texts = model.generate(prompt, cfg.num_words, cfg.num_samples, cfg.temperature, cfg.top_k, cfg.seed)
    out = Path(HydraConfig.get().runtime.output_dir) / "samples.txt"
    out.write_text("".join(f"--- sample {i + 1}\n{text}\n" for i, text in enumerate(texts)))
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}\n{text}")
    return texts


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
