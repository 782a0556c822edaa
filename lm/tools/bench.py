"""Speed of the project's training and evaluation against a plain PyTorch loop and the machine.

    python -m lm.tools.bench                        # small preset: each path trains one full epoch
    python -m lm.tools.bench model=medium trainer.gpus=1 bench.train_steps=400
    python -m lm.tools.bench -m model=small,medium,large trainer.precision=32-true,bf16-mixed   # one process

Prints a table and writes bench.json into the run folder. Every figure comes from this one
process, after a warm-up; the two training paths alternate in `bench.rounds` stretches, so a
shared machine's drifts hit both alike and their ratio is fair. The plain loop runs in the
trainer's precision (autocast for the `-mixed` ones), and the matmul yardstick in its dtype.
"""

import logging
import resource
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lm.config  # noqa: F401 (the option nodes and resolvers that conf/ composes)
from lm.allocator import keep_freed_memory
from lm.errors import Unsupported
from lm.evaluation.dynamic_eval import DynamicEvaluation
from lm.evaluation.scoring import score_stream
from lm.json_output import json_text
from lm.models.network import map_state
from lm.training.summary import flops_per_token
from lm.training.throughput import TokensPerSecond
from lm.training.trainer import build_trainer, check_precision

log = logging.getLogger("bench")


# Lightning's mixed precisions and the dtype their autocast computes in; the others compute in float32.
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def matmul_gflops(
    size: int, device: torch.device, seconds: float = 3.0, dtype: torch.dtype = torch.float32
) -> float:
    """The machine's attainable matrix-multiply rate in `dtype`, the yardstick for the model's."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e9


class PlainLoop:
    """The obvious hand-written loop: same network class, windows, loss scale, clipping and SGD;
    under autocast for a `-mixed` precision, as Lightning's (bf16 needs no loss scaling; float16's
    scaler is left out, which only makes this loop faster)."""

    def __init__(
        self, model: L.LightningModule, clip: float, device: torch.device, precision: str | None = None
    ):
        self.net = model.net.to(device).train()
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=model.options.lr)
        self.clip, self.device = clip, device
        self.autocast_dtype = AUTOCAST_DTYPES.get(str(precision))  # None: float32, autocast off

    def tokens_per_sec(self, loader, steps: int) -> float:
        """Train on the first `steps` windows of an epoch, from a zero state, and time it."""
        state, windows = None, iter(loader)
        started = time.perf_counter()
        for _ in range(steps):
            x, y = (t.to(self.device, non_blocking=True) for t in next(windows))
            with torch.autocast(self.device.type, self.autocast_dtype, self.autocast_dtype is not None):
                out, state = self.net.features(x, state)
                log_probs = self.net.target_log_probs(self.net.drop_output(out), y)  # any softmax
                loss = -log_probs.sum() / x.size(0)
            state = map_state(torch.Tensor.detach, state)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * x.numel() / (time.perf_counter() - started)


class WaitForTheGPU(L.Callback):
    """Waits for the GPU's queued work at the epoch's end, before TokensPerSecond (next in the
    list) stops its clock; otherwise the last steps' kernels would run after it stopped."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def lightning_tokens_per_sec(
    cfg: DictConfig, model: L.LightningModule, datamodule, steps: int
) -> tuple[float, torch.device]:
    """The project's real path: Trainer, LightningModule, logger and progress bar as train.py has them."""
    throughput = TokensPerSecond()
    callbacks = [WaitForTheGPU(), throughput, instantiate(cfg.callbacks.progress_bar)]
    overrides = {
        "max_epochs": 1,
        "limit_train_batches": steps,
        "limit_val_batches": 0,
        "enable_checkpointing": False,
    }
    trainer = build_trainer(
        OmegaConf.merge(cfg.trainer, overrides), callbacks=callbacks, logger=instantiate(cfg.logger)
    )
    trainer.fit(model, datamodule=datamodule)
    return throughput.tokens_per_sec, trainer.strategy.root_device


def timed_dynamic_evaluation(model, datamodule, tokens: int | None, device: torch.device) -> dict[str, float]:
    """The batch-1 pass over the test split's first `tokens` (all if None), plain and with dynamic
    evaluation (`sgd`, evaluate.py's segments of 5), one after the other through lm/evaluation/scoring.py, as
    evaluate.py runs them; the plain pass is timed before and after, and the ratio is to the mean."""
    ids = datamodule.streams["test"].flatten()[: None if tokens is None else tokens + 1]
    net = model.net.to(device)

    def seconds(dynamic: DynamicEvaluation | None) -> float:
        started = time.perf_counter()
        score_stream(net, ids, device, datamodule.options.test_num_steps, dynamic)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    plain = seconds(None)
    dynamic = seconds(DynamicEvaluation(net, "sgd", lr=0.1, decay=0.0, segment_length=5))
    plain = (plain + seconds(None)) / 2
    return {
        "test_tokens_scored": len(ids) - 1,
        "plain_pass_seconds": plain,
        "dynamic_eval_pass_seconds": dynamic,
        "dynamic_eval_over_plain": dynamic / plain,
    }


def timed_evaluation(trainer_cfg: DictConfig, model, datamodule) -> dict[str, float]:
    """Validation tokens/s and the wall time of the exact batch-1 test pass."""
    overrides = {"enable_progress_bar": False, "enable_checkpointing": False}
    trainer = build_trainer(OmegaConf.merge(trainer_cfg, overrides), logger=False)
    started = time.perf_counter()
    trainer.validate(model, datamodule=datamodule, verbose=False)
    val_seconds = time.perf_counter() - started
    started = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    return {
        "val_tokens_per_sec": datamodule.streams["valid"][:, 1:].numel() / val_seconds,
        "test_batch1_seconds": time.perf_counter() - started,
        "test_batch1_tokens": datamodule.streams["test"][:, 1:].numel(),
    }


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def main(cfg: DictConfig) -> dict:
    """In a sweep (-m), a job that fails writes its error to its bench.json and the sweep goes on,
    as train.py's runs do: one preset that fails must not cost the others' figures. A job this
    machine cannot run (bf16 on a CPU without it) is recorded as skipped, with the reason."""
    precision = str(cfg.trainer.precision or "32-true")  # Lightning's default
    job = {"model": HydraConfig.get().runtime.choices.model, "precision": precision}
    try:
        check_precision(cfg.trainer)
        results = {**job, **bench(cfg)}
    except Unsupported as reason:
        log.warning("Skipped: %s", reason)
        results = {**job, "skipped": str(reason)}
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        log.exception("This benchmark failed; the sweep goes on.")
        results = {**job, "error": f"{type(error).__name__}: {error}"}
    out = Path(HydraConfig.get().runtime.output_dir) / "bench.json"
    out.write_text(json_text(results))
    log.info("wrote %s", out)
    return results


def bench(cfg: DictConfig) -> dict:
    """Every figure of bench.json, printed as a table."""
    keep_freed_memory()  # as train.py does
    if torch.cuda.is_available():  # a sweep's earlier jobs ran in this process
        torch.cuda.reset_peak_memory_stats()
    L.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    epoch_steps = len(datamodule.train_dataloader())
    warmup, rounds = cfg.bench.warmup_steps, cfg.bench.rounds
    steps = min(cfg.bench.train_steps or epoch_steps, epoch_steps - warmup) // rounds  # per round

    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    _, device = lightning_tokens_per_sec(cfg, model, datamodule, warmup)
    plain = PlainLoop(
        instantiate(cfg.model, vocab_size=datamodule.vocab_size),
        cfg.trainer.gradient_clip_val,
        device,
        cfg.trainer.precision,
    )
    plain.tokens_per_sec(datamodule.train_dataloader(), warmup)

    # Alternate the two paths; each covers `rounds * steps` windows of the epoch. The matmul
    # reference is probed between the stretches too, so it sees the same drifts.
    lightning_seconds = plain_seconds = 0.0
    tokens = steps * datamodule.streams["train"].size(0) * datamodule.options.num_steps
    matmul_dtype = plain.autocast_dtype or torch.float32

    def probe_matmul() -> float:
        return matmul_gflops(cfg.bench.matmul_size, device, cfg.bench.matmul_seconds, matmul_dtype)

    probes = [probe_matmul()]
    for _ in range(rounds):
        lightning_seconds += tokens / lightning_tokens_per_sec(cfg, model, datamodule, steps)[0]
        plain_seconds += tokens / plain.tokens_per_sec(datamodule.train_dataloader(), steps)
        probes.append(probe_matmul())
    lightning, baseline = rounds * tokens / lightning_seconds, rounds * tokens / plain_seconds

    # From the network's layers; NaN with the adaptive softmax, whose cost depends on the targets.
    flops = flops_per_token(model.net)
    peak = sum(probes) / len(probes)
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads",
        "timed_train_steps_per_path": rounds * steps,
        "epoch_steps": epoch_steps,
        "lightning_train_tokens_per_sec": lightning,
        "plain_loop_train_tokens_per_sec": baseline,
        "lightning_over_plain": lightning / baseline,
        "train_flops_per_token": flops,
        "lightning_train_gflops": lightning * flops / 1e9,
        "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
        "matmul_gflops": peak,  # the mean of the probes
        "matmul_gflops_probes": [round(probe, 1) for probe in probes],
        "lightning_fraction_of_matmul": lightning * flops / 1e9 / peak,
        "plain_loop_fraction_of_matmul": baseline * flops / 1e9 / peak,
        **timed_evaluation(cfg.trainer, model, datamodule),
        **timed_dynamic_evaluation(model, datamodule, cfg.bench.dynamic_eval_tokens, device),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Both paths' models are on the device, each with its gradients: the peak of all of it.
        "gpu_peak_memory_mib": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
    }
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return results


if __name__ == "__main__":
    main()
