"""bfloat16 on a CPU: trained where PyTorch's LSTM has the kernel, refused in one line where it has
not, and recorded as skipped by the benchmark. The missing kernel is simulated where the CPU has it."""

import json

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import lm.training.trainer
from lm.errors import Unsupported
from lm.tools import bench
from lm.training.command_check import check_command
from lm.training.trainer import cpu_runs_bf16_lstm
from tests.conftest import TINY_RUN, compose_config, run_train
from tests.test_config_checks import refused

REFUSAL = (
    "trainer.precision=bf16-mixed cannot run on this CPU: PyTorch's LSTM (oneDNN) has no bfloat16 kernel"
)


@pytest.fixture
def no_bf16_lstm(monkeypatch):
    """A CPU without AVX-512 or AMX, as far as the project can tell."""
    monkeypatch.setattr(lm.training.trainer, "cpu_runs_bf16_lstm", lambda: False)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_on_a_cpu_without_the_kernel_is_refused_before_any_data_is_read(no_bf16_lstm, precision):
    with pytest.raises(Unsupported) as refusal:
        check_command(compose_config(f"trainer.precision={precision}", "data.dir=/nonexistent"))
    message = str(refusal.value)
    assert f"trainer.precision={precision} cannot run on this CPU" in message
    assert "Use trainer.precision=32-true here, or bf16 on a GPU." in message


def test_bf16_on_a_gpu_or_32_bits_on_this_cpu_are_not_refused(no_bf16_lstm, monkeypatch):
    check_command(compose_config("trainer.precision=32-true"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_command(compose_config("trainer.precision=bf16-mixed"))  # accelerator auto: the GPU
    check_command(compose_config("trainer.precision=bf16-mixed", "trainer.gpus=1"))


def test_train_py_with_bf16_trains_or_stops_in_one_line(tiny_corpus, tmp_path):
    """On any CPU: where the kernel exists the run completes, elsewhere it is the one-line refusal."""
    result = run_train(
        *TINY_RUN,
        "trainer.max_epochs=1",
        "trainer.precision=bf16-mixed",
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    if cpu_runs_bf16_lstm():
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    else:
        refused(result, REFUSAL)


def test_the_benchmark_records_a_job_this_cpu_cannot_run_as_skipped(no_bf16_lstm, tmp_path):
    cfg = compose_config("trainer.precision=bf16-mixed", "trainer.accelerator=cpu", config_name="bench")
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    results = bench.main(cfg)
    assert results["precision"] == "bf16-mixed" and results["skipped"].startswith(REFUSAL)
    assert json.loads((tmp_path / "bench.json").read_text()) == results
