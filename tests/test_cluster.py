"""SLURM without a cluster: the launcher config, and Lightning reading the job's variables."""

import json
import os
import subprocess
import sys

import pytest
from hydra.utils import instantiate

from lm import PROJECT_ROOT
from tests.conftest import compose_config


@pytest.mark.parametrize(
    ("overrides", "nodes", "tasks", "gpus"),
    [
        (["trainer.gpus=4", "trainer.num_nodes=2"], 2, 4, 4),
        (["trainer.devices=2"], 1, 2, 2),
        (["trainer.accelerator=cpu", "trainer.devices=2"], 1, 2, 0),
    ],
)
def test_the_slurm_launcher_asks_for_one_task_per_device(overrides, nodes, tasks, gpus):
    launcher = compose_config("hydra/launcher=slurm", *overrides).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (nodes, tasks, gpus)
    assert launcher.additional_parameters.signal == "USR1@120"  # the save-and-requeue signal
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"


# Rank 3 of a 2-node x 2-task job, as srun sets it for the fourth process.
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "2",
    "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}

# What train.py builds in such a process, in a sweep (so the relaunch guard is exercised too).
PROBE = """
import json, sys
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write
from lm.data.datamodule import PTBDataModule
from lm.training.trainer import build_trainer
from tests.conftest import compose_config

cfg = compose_config("trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2")
with read_write(cfg.hydra):
    cfg.hydra.mode = RunMode.MULTIRUN
HydraConfig.instance().set_config(cfg)
trainer = build_trainer(cfg.trainer, logger=False)
environment = trainer.strategy.cluster_environment
data = PTBDataModule(dir=sys.argv[1], cache_dir=sys.argv[2], batch_size=20)
data.trainer = trainer
data.setup("fit")
print(json.dumps({
    "environment": type(environment).__name__,
    "auto_requeue": environment.auto_requeue,
    "main_address": environment.main_address,
    "world_size": trainer.world_size,
    "ranks": [trainer.global_rank, trainer.local_rank, trainer.node_rank],
    "relaunches": not environment.creates_processes_externally,
    "train_rows": data.streams["train"][:, 0].tolist(),
    "all_rows": data.corpus.splits["train"].tolist()[:: len(data.corpus.splits["train"]) // 20][:20],
}))
"""


def test_lightning_takes_the_world_from_the_slurm_variables(tiny_corpus, tmp_path):
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (p and os.path.exists(f"{p}/srun"))
    )
    env = {**os.environ, **SLURM, "PATH": path, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_corpus), str(tmp_path / "cache")],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    # lm.training.safe_stop saves at a safe point and requeues; Lightning's would save in its handler.
    assert probe["environment"] == "SLURMEnvironment" and not probe["auto_requeue"]
    assert probe["main_address"] == "gpu07"
    assert (probe["world_size"], probe["ranks"]) == (4, [3, 1, 1])
    assert not probe["relaunches"]  # SLURM started the processes, so a sweep may use them
    assert probe["train_rows"] == probe["all_rows"][15:20]  # rank 3 of 4 reads streams 15-19 of 20
