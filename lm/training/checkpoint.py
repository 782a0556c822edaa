"""What a checkpoint holds and who writes each part (docs/design.md, "Interruptions"); reading one
safely is lm/training/checkpoint_file.py's.

A checkpoint is the dict Lightning's `trainer.save_checkpoint` writes:

    state_dict           the network's weights (with NT-ASGD: the average, see training_state_dict),
                         the training perplexity's sums of the epoch so far, the average's state
    optimizer_states     SGD's state                                              (Lightning)
    loops, epoch, global_step, ...   where training is, to the window            (Lightning)
    hyper_parameters     LanguageModel's arguments, to build it again             (Lightning)
    callbacks            TrainingCheckpoint: the random generators (`random_state`), the run's wall time;
                         BestCheckpoint: the best scores; TokensPerSecond: tokens and seconds
    validation_metrics   the last validation's values, which the epoch's end ranks (TrainingCheckpoint)

and what the LightningModule adds, all in `save_module_state` below:

    vocabulary           the tokens and tokenisation: using a model never needs its data
    train_state          the carried state of every stream, for a resume in the middle of an epoch
    train_ppl_by_rank    each rank's training sums (several processes only)
    run_config           train.py's whole configuration, which a resume must repeat
    asgd                 NT-ASGD's validation history and switch epoch (lm/training/averaging.py)
    training_state_dict  the raw weights training goes on from, once weights are averaged

Every entry is a tensor or a plain value, so `read_checkpoint` unpickles with weights_only=True,
and only once the file's checksums hold. Writing one whole or not at all is the Trainer's
CheckpointIO's (lm/training/checkpoint_io.py).
"""

import os
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lm.data.vocabulary import Vocabulary
from lm.errors import UserError
from lm.models.network import map_state
from lm.training.lightning_private import attached_trainer


def save_module_state(module: L.LightningModule, checkpoint: dict) -> None:
    """The LightningModule's entries (called on every rank: the gathers need them all)."""
    if module.vocabulary is not None:
        checkpoint["vocabulary"] = module.vocabulary.state_dict()
    checkpoint["train_state"] = _all_ranks_state(module)
    trainer = attached_trainer(module)
    if trainer is not None and trainer.world_size > 1:  # each rank's sums of the epoch so far
        sums = torch.stack([module.train_ppl.nll_sum, module.train_ppl.count])
        checkpoint["train_ppl_by_rank"] = module.all_gather(sums)  # (ranks, 2)
    if module.run_config is not None:
        checkpoint["run_config"] = module.run_config
    module.averaging.save(checkpoint)


def load_module_state(module: L.LightningModule, checkpoint: dict) -> None:
    """Before Lightning loads `checkpoint["state_dict"]` into the module: its vocabulary (refused
    when resuming on other data), the averaging, this rank's sums and carried state."""
    trainer = attached_trainer(module)
    fitting = trainer is not None and trainer.state.fn == "fit"
    if "vocabulary" in checkpoint:  # none when the module was trained without a datamodule that has one
        saved = Vocabulary.from_state_dict(checkpoint["vocabulary"])
        if fitting and module.vocabulary is not None and saved != module.vocabulary:
            raise UserError(
                f"resume: the checkpoint's vocabulary ({len(saved)} types) is not the one of the data "
                f"now ({len(module.vocabulary)}): data.dir or its files changed since the run began. "
                "Resume with the run's own data, or start a new run."
            )
        module.vocabulary = saved
    module.averaging.load(checkpoint, module.net, fitting)
    world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
    _restore_training_sums(checkpoint, world, rank)
    state = checkpoint.get("train_state")
    if state is not None and world > 1:
        rows = state[0][0].size(1) // world  # this rank's streams
        state = map_state(lambda s: s[:, rank * rows : (rank + 1) * rows], state)
    module.train_state = state


def _restore_training_sums(checkpoint: dict, world: int, rank: int) -> None:
    """This rank's training sums: its own when the process count is the one saved, else the total
    on rank 0 (the epoch's perplexity is their sum over ranks either way)."""
    by_rank = checkpoint.get("train_ppl_by_rank")
    if by_rank is None:
        return  # one process saved it: the module's own state_dict holds the sums
    if by_rank.size(0) == world:
        sums = by_rank[rank]
    else:
        sums = by_rank.sum(0) if rank == 0 else torch.zeros_like(by_rank[0])
    checkpoint["state_dict"]["train_ppl.nll_sum"], checkpoint["state_dict"]["train_ppl.count"] = sums


def _all_ranks_state(module: L.LightningModule):
    """The carried state of all streams: each rank holds its own rows (called on every rank)."""
    state = module.train_state
    trainer = attached_trainer(module)
    if state is None or trainer is None or trainer.world_size == 1:
        return state
    # all_gather: (ranks, layers, rows, size) -> (layers, ranks * rows, size)
    return map_state(lambda s: module.all_gather(s).transpose(0, 1).flatten(1, 2), state)


def random_state() -> dict:
    """The random generators, which Lightning leaves out of a checkpoint: without them a resumed run
    draws other dropout masks. Tensors and plain values only (NumPy's keys as a tensor)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_initialized():  # this process's GPU; every rank starts from the same seed
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose best scores survive a moved run folder.

    Lightning drops them when the saved `dirpath` differs from today's, and then writes a best
    checkpoint over a better one; the paths are rebased onto the folder the run is in now.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        then, now = state_dict.get("dirpath"), self.dirpath
        if then and now and then != now:

            def moved(path: str) -> str:
                return os.path.join(now, os.path.relpath(path, then)) if path else path

            state_dict = {
                **state_dict,
                "dirpath": now,
                "best_model_path": moved(state_dict["best_model_path"]),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path", "")),
                "last_model_path": moved(state_dict.get("last_model_path", "")),
                "best_k_models": {moved(p): v for p, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)
