"""A trained model out of the lab: a model folder that loads without Lightning or Hydra, and with
onnx=true an ONNX graph that carries the state as inputs and outputs (docs/export.md).

    python -m lm.tools.export ckpt_path=CKPT out=DIR                    # config.json, model.safetensors,
                                                                        # vocab.txt, README.md
    python -m lm.tools.export ckpt_path=CKPT out=DIR onnx=true int8=true  # + model.onnx, model.int8.onnx

The folder is written beside `out` first and moved into place whole, so that an export that fails
leaves no half folder; an `out` that holds files is refused unless overwrite=true.
"""

import json
import logging
import shutil
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import lm.config  # noqa: F401 (the option nodes and resolvers that conf/ composes)
from lm.errors import UserError, exit_on_user_error
from lm.evaluation import model_folder
from lm.evaluation.loading import model_of_checkpoint
from lm.evaluation.model_folder import TrainedModel, write_model_folder
from lm.evaluation.options import ExportOptions
from lm.evaluation.outputs import check_folder
from lm.models.network import network_options
from lm.options import defaults, problems, refuse
from lm.tools.onnx_export import onnx_model, quantize, write_onnx
from lm.training.checkpoint_file import network_node, read_checkpoint

log = logging.getLogger("export")

ONNX, INT8 = "model.onnx", "model.int8.onnx"
FOLDER_FILES = (*model_folder.FILES, ONNX, INT8)


def export(cfg: DictConfig) -> Path:
    refuse(problems(ExportOptions, {key: cfg[key] for key in defaults(ExportOptions)}, ""))
    if cfg.int8 and not cfg.onnx:
        raise UserError("int8=true quantises the ONNX graph: give onnx=true with it.")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise UserError(f"ckpt_path={ckpt} is not a file; give a .ckpt from a run's checkpoints/ folder.")
    out = Path(str(cfg.out)).expanduser()
    _check_out(out, cfg.overwrite)
    check_folder(out, "out")
    checkpoint = read_checkpoint(ckpt, "ckpt_path")  # once: the model and the card both come from it
    model = model_of_checkpoint(checkpoint, ckpt)
    net_options = dict(network_node(checkpoint))
    if cfg.onnx:  # before anything is written: a network ONNX cannot take, or the extra missing
        onnx_graph = onnx_model(model, network_options()[net_options["_target_"]].name)
    origin = _origin(ckpt, checkpoint)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write_model_folder(partial, net_options, model, model_card(model, net_options, origin), origin)
        if cfg.onnx:
            write_onnx(onnx_graph, partial / ONNX)
            if cfg.int8:
                quantize(partial / ONNX, partial / INT8)
        _move_into(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("model folder: %s (%s)", out, ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file: give out a folder (made if missing).")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"out={out} holds files already: give an empty or new folder, or overwrite=true to replace "
            f"the model folder's files there ({', '.join(FOLDER_FILES)})."
        )


def _move_into(partial: Path, out: Path) -> None:
    """The written files into `out`; with overwrite, an earlier export's files that this one did not
    write (model.onnx, when onnx=false now) go, so that the folder never mixes two models."""
    out.mkdir(parents=True, exist_ok=True)
    for name in FOLDER_FILES:
        (out / name).unlink(missing_ok=True)
    for written in partial.iterdir():
        written.replace(out / written.name)


def _origin(ckpt: Path, checkpoint: dict) -> dict:
    """What the run folder beside a checkpoint says of it: the command, the perplexities."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    metrics = checkpoint.get("validation_metrics", {})
    origin = {
        "checkpoint": ckpt.name,
        "global_step": checkpoint.get("global_step"),
        "val_ppl": float(metrics["val/ppl"]) if "val/ppl" in metrics else None,
        "test_ppl": None,
        "command": None,
        "data": _data_of(checkpoint.get("run_config", {})),
    }
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        origin["command"] = " ".join(["python train.py", *map(str, OmegaConf.load(overrides))])
    run_metrics = run / "metrics.json"
    if run_metrics.is_file():
        recorded = json.loads(run_metrics.read_text())
        best = recorded.get("best_checkpoint")
        if best and (run / best).resolve() == ckpt.resolve() and recorded.get("test_ppl") is not None:
            origin["test_ppl"] = recorded["test_ppl"]  # train.py's test is of its best checkpoint only
    return origin


def _data_of(run_config: dict) -> str | None:
    data = run_config.get("data")
    if not data:
        return None
    corpus = str(data.get("_target_", "")).rsplit(".", 1)[-1].removesuffix("DataModule") or "text"
    folder = Path(str(data.get("dir", ""))).name
    lowercased = ", lowercased" if data.get("lowercase") else ""
    return f"{corpus} (the folder {folder}), {data.get('level', 'word')}-level{lowercased}"


def model_card(model: TrainedModel, net_options: dict, origin: dict) -> str:
    """README.md: what the model is, what it was trained on and how, and how well it does."""
    parameters = sum(p.numel() for p in model.net.parameters())  # tied matrices once

    def ppl(value: float | None, missing: str) -> str:
        return f"{value:.2f}" if value is not None else missing

    untested = "not measured for this checkpoint: python evaluate.py ckpt_path=FOLDER"

    network = network_options()[net_options["_target_"]].name
    return f"""# {network} language model

A {model.vocabulary.tokenizer.level}-level recurrent language model trained with lstm-lm (python train.py).

| | |
|---|---|
| network | {network}: {parameters / 1e6:.2f}M parameters; its options are config.json's "network" |
| vocabulary | {len(model.vocabulary):,} tokens (vocab.txt) |
| data | {origin["data"] or "not recorded in the checkpoint"} |
| trained by | `{origin["command"] or "not recorded: the run folder was not beside the checkpoint"}` |
| checkpoint | {origin["checkpoint"]}, after {origin["global_step"]} training steps |
| validation perplexity | {ppl(origin["val_ppl"], "not recorded")} |
| test perplexity | {ppl(origin["test_ppl"], untested)} |

Perplexities are of batch-1 passes over whole splits with the state carried (docs/evaluation.md).

## Use

    from lm.api import LanguageModel
    model = LanguageModel.load("FOLDER")
    model.score("the cat sat on the mat").log_prob

or `python evaluate.py ckpt_path=FOLDER`, `python score.py ckpt_path=FOLDER file=...`,
`python generate.py ckpt_path=FOLDER prompt=...`. Loading needs torch, safetensors and this package's
lm/ (not Lightning or Hydra); nothing in this folder is executed.
"""


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
