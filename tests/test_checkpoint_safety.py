"""A checkpoint someone hands over cannot run code here: every path that reads one unpickles tensors
and plain values only (`torch.load(weights_only=True)`) and refuses anything else in one line."""

import os
import types
from pathlib import Path

import pytest
import torch

from lm.errors import UserError
from lm.training.trainer import recover_state_after_spawn
from tests.conftest import TINY_RUN, run_script, run_train, write_tiny_corpus
from tests.test_config_checks import refused


class RunsCode:
    """Unpickled without weights_only, this object runs `code`: what a malicious checkpoint holds."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    """A real run's folder whose last.ckpt also holds an object that would write `marker` when
    unpickled: a checkpoint that loads everywhere if its code is allowed to run."""
    root = tmp_path_factory.mktemp("crafted")
    corpus = write_tiny_corpus(root / "tiny")
    run = root / "run"
    data = [f"data.dir={corpus}", f"data.cache_dir={root / 'cache'}"]
    result = run_train(*TINY_RUN, "trainer.max_epochs=1", *data, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    marker = root / "code-ran"
    checkpoint["payload"] = RunsCode(f"open({str(marker)!r}, 'w').write('ran')")
    torch.save(checkpoint, last)
    (root / "lines.txt").write_text("the cat sat\n")
    return {"run": run, "last": last, "marker": marker, "corpus": corpus, "root": root, "data": data}


def refuses_without_running_it(result, crafted: dict[str, Path], key: str) -> None:
    what = "holds a reference to exec, not only tensors and plain values, and unpickling it could run code"
    refused(result, f"{key}={crafted['last']} {what}")
    assert not crafted["marker"].exists()


@pytest.mark.parametrize("resume", ["folder", "ckpt"])
def test_resuming_a_crafted_checkpoint_refuses_it(crafted, resume):
    target = crafted["run"] if resume == "folder" else crafted["last"]
    result = run_train(*TINY_RUN, "trainer.max_epochs=2", *crafted["data"], f"resume={target}")
    refuses_without_running_it(result, crafted, "resume")


@pytest.mark.parametrize(
    ("script", "overrides"),
    [
        ("evaluate.py", ["data.dir={corpus}"]),
        ("generate.py", ["prompt=the"]),
        ("score.py", ["file={root}/lines.txt"]),
    ],
)
def test_the_tools_refuse_a_crafted_checkpoint(crafted, script, overrides, tmp_path):
    overrides = [o.format(root=crafted["root"], corpus=crafted["corpus"]) for o in overrides]
    result = run_script(script, f"ckpt_path={crafted['last']}", *overrides, f"hydra.run.dir={tmp_path}")
    refuses_without_running_it(result, crafted, "ckpt_path")


def test_the_ddp_spawn_recovery_refuses_a_crafted_last_checkpoint(crafted):
    """After ddp_spawn, train.py reads last.ckpt back for what the workers knew."""
    checkpoint_callback = types.SimpleNamespace(
        best_model_path=str(crafted["run"] / "checkpoints" / "best.ckpt"),
        best_model_score=None,
        dirpath=str(crafted["last"].parent),
        CHECKPOINT_NAME_LAST="last",
        FILE_EXTENSION=".ckpt",
    )
    trainer = types.SimpleNamespace(checkpoint_callback=checkpoint_callback, callbacks=[])
    with pytest.raises(UserError, match="holds a reference to exec, not only tensors"):
        recover_state_after_spawn(trainer)
    assert not crafted["marker"].exists()


def test_the_crafted_checkpoint_would_run_its_code_if_unpickled_freely(crafted, tmp_path):
    """The check of the test itself: the payload is live."""
    marker = tmp_path / "ran"
    torch.save({"payload": RunsCode(f"open({str(marker)!r}, 'w').write('ran')")}, tmp_path / "x.ckpt")
    torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert marker.exists() and os.path.getsize(marker) == 3


def test_a_checkpoint_cannot_make_evaluate_import_a_module_it_names(crafted, tmp_path):
    """The network's options class named in a checkpoint is looked up among the networks, never
    imported: Python's `this` module prints the Zen of Python when it is imported."""
    (best,) = crafted["last"].parent.glob("epoch*.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["net"]["_target_"] = "this.s"
    torch.save(checkpoint, tmp_path / "named.ckpt")
    result = run_script(
        "evaluate.py",
        f"ckpt_path={tmp_path / 'named.ckpt'}",
        f"data.dir={crafted['corpus']}",
        f"hydra.run.dir={tmp_path}",
    )
    refused(result, "model.net._target_='this.s' is not allowed: it must be the options of a network")
    assert "Beautiful is better than ugly" not in result.stdout + result.stderr
