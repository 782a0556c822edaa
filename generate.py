"""Sample continuations of a prompt from a trained model.

    python generate.py ckpt_path=PATH prompt="the company said" num_words=50 temperature=0.8 top_k=40 seed=1
    python generate.py ckpt_path=PATH prompt="the" num_samples=5 temperature=0      # greedy

The prompt is read after an `<eos>`, as a sentence start; `<eos>` prints as a line break. Prints
the samples and writes them to <run dir>/samples.txt.
"""

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lm.data.text import EOS
from lm.errors import UserError, exit_on_user_error
from lm.evaluation.generation import sample
from lm.evaluation.loading import load_model, pick_device

log = logging.getLogger("generate")


def generate(cfg: DictConfig) -> list[str]:
    for key, value, smallest in (
        ("num_words", cfg.num_words, 0),
        ("num_samples", cfg.num_samples, 1),
        ("top_k", cfg.top_k or 0, 0),
        ("seed", cfg.seed, 0),
    ):
        if not isinstance(value, int) or value < smallest:
            raise UserError(f"{key}={value!r} must be an integer, {smallest} or more.")
    if not isinstance(cfg.temperature, int | float) or not (cfg.temperature == 0 or cfg.temperature >= 1e-3):
        raise UserError(f"temperature={cfg.temperature!r} must be 0 (greedy) or a number of at least 0.001.")
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt_path, device)
    vocabulary = model.vocabulary
    prompt = vocabulary.tokenizer.tokens(str(cfg.prompt))
    unknown = vocabulary.unknown(prompt)
    if unknown:
        log.warning("Not in the model's vocabulary, read as <unk>: %s", ", ".join(unknown))

    generator = torch.Generator(device).manual_seed(cfg.seed)
    ids = sample(
        model.net,
        vocabulary.encode([EOS, *prompt]).to(device),
        cfg.num_words,
        cfg.num_samples,
        cfg.temperature,
        cfg.top_k,
        generator,
    )
    texts = [vocabulary.tokenizer.join(prompt + vocabulary.decode(row)) for row in ids.cpu()]
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
