"""The GPU path: cuDNN's LSTM against the CPU, bf16-mixed, the GPU-side divergence check,
determinism, weight-drop on cuDNN's weights, checkpoints saved on the GPU, and the tools on cuda.

Skipped where no GPU is visible; `scripts/gpu-check` runs them where one is lent. Comparisons with
the CPU run in float32 with TF32 off (PyTorch lets cuDNN's RNNs use TF32 by default), so that the
two differ only in the order of their sums; each tolerance below says how far that goes.
"""

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from generate import generate
from lm.data.datamodule import PTBDataModule
from lm.models.lstm import LSTMNetwork, LSTMOptions
from lm.training.module import Diverged, LanguageModel
from score import score
from tests.conftest import (
    TINY_RUN,
    app_config,
    language_model,
    quiet_trainer,
    random_lines,
    run_script,
    run_train,
    write_corpus,
    write_tiny_corpus,
)
from tests.test_adaptation import run_evaluate
from tests.test_interruptions import assert_same_run, signal_at
from tests.test_learning import TRUE_PERPLEXITY, coin_lines
from tests.test_networks import TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible (scripts/gpu-check)"),
]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
VOCAB = 40
STEPS = 105  # training windows per epoch of the corpus below (8 streams of 20 tokens)
# Deterministic kernels, every step logged (and so checked for divergence), dropout on, an lr that
# halves each epoch after the first: only a run that restores everything repeats every number.
RUN = [
    *TINY_RUN,
    "trainer.accelerator=gpu",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "model.decay_after=1",
    "model.lr_decay=0.5",
]
DROPOUTS = {
    # Zaremba's: between the layers of one nn.LSTM, cuDNN drops units with a random state of its own,
    # seeded from the CUDA generator when that is seeded or set, and kept in no checkpoint.
    "zaremba": ["model.net.dropout=0.3"],
    # AWD-LSTM's: locked dropout and weight-drop, every mask drawn from the CUDA generator.
    "awd": [
        "model.net.input_dropout=0.2",
        "model.net.hidden_dropout=0.2",
        "model.net.output_dropout=0.2",
        "model.net.weight_drop=0.3",
    ],
}


@pytest.fixture
def ieee_float32():
    """float32 as the CPU computes it: no TF32 in cuDNN (PyTorch's default for RNNs) or cuBLAS."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Every element within `tolerance` times the largest magnitude of `expected`: float32 sums
    taken in another order differ by a few units in the last place of their largest terms."""
    expected = expected.detach().double().cpu()
    atol = tolerance * expected.abs().max().item()
    torch.testing.assert_close(actual.detach().double().cpu(), expected, rtol=0, atol=atol)


class SameMasks:
    """F.dropout whose k-th mask comes from a CPU generator seeded k, on any device: two models
    called alike drop the same weights on the CPU and on the GPU."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not training or p == 0:
            return input
        generator = torch.Generator().manual_seed(self.calls)
        self.calls += 1
        keep = torch.rand(input.shape, generator=generator) >= p
        return input * keep.to(input.device) / (1 - p)


def two_windows_and_gradients(model: LanguageModel, ids: torch.Tensor, device: torch.device, monkeypatch):
    """Evaluation logits of two windows and the training loss of each (state carried across
    them), and the gradients of the summed losses."""
    monkeypatch.setattr(torch.nn.functional, "dropout", SameMasks())  # weight-drop's masks
    model = model.to(device)
    model.trainer = quiet_trainer()  # what training_step reads; nothing is logged at step 0
    ids = ids.to(device)
    windows = [(ids[:, :10], ids[:, 1:11]), (ids[:, 10:20], ids[:, 11:21])]
    model.eval()
    state, logits = None, []
    for x, _ in windows:
        window_logits, state = model(x, state)
        logits.append(window_logits)
    model.train()
    losses = torch.stack([model.training_step(window, i) for i, window in enumerate(windows)])
    losses.sum().backward()
    return torch.cat(logits, 1), losses, [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "options",
    [
        {},  # Zaremba's stack: one two-layer nn.LSTM, one cuDNN call
        # AWD-LSTM: one nn.LSTM a layer, weight-drop, a smaller tied last layer, AR/TAR, tokens' mean
        {
            "embedding_size": 24,
            "tie_weights": True,
            "weight_drop": 0.5,
            "init": "awd",
            "ar": 2.0,
            "tar": 1.0,
            "loss_average": "tokens",
        },
    ],
    ids=["zaremba", "awd"],
)
def test_cudnn_gives_the_cpus_logits_losses_and_gradients(options, ieee_float32, monkeypatch):
    assert torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    torch.manual_seed(0)
    cpu_model = language_model(VOCAB, hidden_size=32, init_scale=0.3, **options)
    gpu_model = language_model(VOCAB, hidden_size=32, init_scale=0.3, **options)
    gpu_model.load_state_dict(cpu_model.state_dict())
    assert_the_gpu_gives_the_cpus(cpu_model, gpu_model, monkeypatch)


def assert_the_gpu_gives_the_cpus(cpu_model: LanguageModel, gpu_model: LanguageModel, monkeypatch) -> None:
    """Two windows' logits, losses and gradients of the same weights on the CPU and on the GPU."""
    ids = torch.randint(VOCAB, (4, 21), generator=torch.Generator().manual_seed(1))
    cpu_logits, cpu_losses, cpu_grads = two_windows_and_gradients(cpu_model, ids, CPU, monkeypatch)
    gpu_logits, gpu_losses, gpu_grads = two_windows_and_gradients(gpu_model, ids, CUDA, monkeypatch)
    assert gpu_logits.device.type == "cuda" and gpu_grads[0].device.type == "cuda"
    # float32 is within 4e-7 of the same model in float64 here (on the CPU): 25x and 80x that.
    assert_near(gpu_logits, cpu_logits, 1e-5)
    assert_near(gpu_losses, cpu_losses, 1e-5)
    for gpu_grad, cpu_grad in zip(gpu_grads, cpu_grads, strict=True):
        assert_near(gpu_grad, cpu_grad, 3e-5)


@pytest.mark.parametrize("name", [name for name in TINY if name != "lstm"])
def test_every_other_network_gives_the_cpus_logits_losses_and_gradients(name, ieee_float32, monkeypatch):
    """The networks of hand-written cells (tests/test_networks.py's tiny ones), with dropout on."""
    torch.manual_seed(0)
    net = {**TINY[name], "dropout": 0.3}
    cpu_model, gpu_model = (LanguageModel(VOCAB, net, loss_average="tokens") for _ in range(2))
    gpu_model.load_state_dict(cpu_model.state_dict())
    assert_the_gpu_gives_the_cpus(cpu_model, gpu_model, monkeypatch)


def test_weight_drop_on_cudnn_warns_nothing_and_leaves_the_weights_and_their_flat_buffer():
    torch.manual_seed(0)
    net = LSTMNetwork(VOCAB, LSTMOptions(hidden_size=32, weight_drop=0.5)).to(CUDA)
    weights = [p.detach().clone() for p in net.parameters()]
    # cuDNN's flat buffer: nn.LSTM's weights are views of one storage, which cuDNN reads directly.
    buffers = [{w.untyped_storage().data_ptr() for w in rnn._flat_weights} for rnn in net.rnns]
    assert all(len(buffer) == 1 for buffer in buffers)
    x = torch.randint(VOCAB, (4, 10), device=CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a word from PyTorch or cuDNN, forward or backward
        net.train()
        for _ in range(3):
            logits, _ = net(x)
            logits.square().mean().backward()
        net.eval()
        net(x)  # nn.LSTM's own call: cuDNN would warn here had its weights left the flat buffer
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights, strict=True))
    assert [{w.untyped_storage().data_ptr() for w in rnn._flat_weights} for rnn in net.rnns] == buffers
    for rnn in net.rnns:
        names = rnn._flat_weights_names
        assert all(w is getattr(rnn, name) for w, name in zip(rnn._flat_weights, names, strict=True))
        assert rnn.weight_hh_l0.grad.count_nonzero() > 0  # the gradient reaches it through the mask


def test_bf16_mixed_trains_as_float32_does_and_keeps_the_perplexity_sums_in_float64(tmp_path):
    # Each line's words follow a known law (tests/test_learning.py): 3 epochs, 672 steps, learn it.
    folder = write_corpus(
        tmp_path / "coins",
        {"train": coin_lines(2000, 0), "valid": coin_lines(300, 1), "test": coin_lines(300, 2)},
    )
    sums = []

    class RecordSums(L.Callback):
        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            sums.append((module.val_ppl.nll_sum.dtype, module.val_ppl.nll_sum.device.type))

    val_ppl = {}
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        datamodule = PTBDataModule(
            dir=folder, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=8, num_steps=10
        )
        model = language_model(datamodule.vocab_size, hidden_size=32, init_scale=0.1, lr=1.0, decay_after=2)
        trainer = quiet_trainer(
            "gpu", max_epochs=3, gradient_clip_val=5, precision=precision, callbacks=[RecordSums()]
        )
        trainer.fit(model, datamodule=datamodule)
        val_ppl[precision] = trainer.callback_metrics["val/ppl"].item()
    assert set(sums) == {(torch.float64, "cuda")}
    assert 0.97 * TRUE_PERPLEXITY < val_ppl["32-true"] < 1.05 * TRUE_PERPLEXITY, val_ppl  # it learnt
    # bfloat16 keeps 8 bits of mantissa; the model learns the same law (on the CPU: 0.1% apart).
    assert val_ppl["bf16-mixed"] == pytest.approx(val_ppl["32-true"], rel=0.03), val_ppl


def test_divergence_on_the_gpu_stops_at_the_first_logging_step_after_it(tmp_path):
    # The lr is multiplied by 3e38 from the second epoch: on the CPU the loss is not finite at step
    # STEPS + 1 (tests/test_reliability.py); a GPU checks it on logging steps only (every 10 here).
    corpus = write_tiny_corpus(tmp_path / "tiny")
    datamodule = PTBDataModule(
        dir=corpus, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=8, num_steps=20
    )
    model = language_model(datamodule.vocab_size, hidden_size=16, lr_decay=3e38, decay_after=1)
    trainer = quiet_trainer("gpu", max_epochs=2, log_every_n_steps=10, gradient_clip_val=5)
    with pytest.raises(Diverged) as stop:
        trainer.fit(model, datamodule=datamodule)
    assert stop.value.step == 109  # the first step s >= STEPS + 1 with (s + 1) % 10 == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("gpu")
    return [f"data.dir={write_tiny_corpus(root / 'tiny')}", f"data.cache_dir={root / 'cache'}"]


@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory):
    """train.py on the GPU, uninterrupted, for each kind of dropout; made when a test first needs it."""
    runs: dict[str, Path] = {}

    def reference(name: str) -> Path:
        if name not in runs:
            run = tmp_path_factory.mktemp(f"reference-{name}") / "run"
            result = run_train(*RUN, *DROPOUTS[name], *corpus, f"hydra.run.dir={run}", gpu=True)
            assert result.returncode == 0, result.stdout + result.stderr
            runs[name] = run
        return runs[name]

    return reference


def test_deterministic_runs_with_one_seed_give_the_same_numbers(corpus, references, tmp_path):
    run = tmp_path / "run"
    result = run_train(*RUN, *DROPOUTS["zaremba"], *corpus, f"hydra.run.dir={run}", gpu=True)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics, expected = (json.loads((r / "metrics.json").read_text()) for r in (run, references("zaremba")))
    numbers = ("status", "val_ppl", "test_ppl", "test_acc", "epochs")
    assert {key: metrics[key] for key in numbers} == {key: expected[key] for key in numbers}
    assert_same_run(run, references("zaremba"))  # and every step's loss, lr and the final weights


@pytest.mark.parametrize("name", DROPOUTS)
def test_a_checkpoint_saved_on_the_gpu_resumes_there_exactly_mid_epoch(corpus, references, tmp_path, name):
    run = tmp_path / "run"
    arguments = [*RUN, *DROPOUTS[name], *corpus, *signal_at(tmp_path / "fired", "step", step=STEPS + 37)]
    stopped = run_train(*arguments, f"hydra.run.dir={run}", gpu=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"Stopped by SIGTERM at step {STEPS + 37} (epoch 2)" in stopped.stdout
    saved = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert "cuda" in saved["callbacks"]["TrainingCheckpoint"]  # the CUDA generator's state
    assert saved["train_state"] is not None  # and the state carried into the next window
    resumed = run_train(*arguments, f"resume={run}", gpu=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(run, references(name))


def test_a_checkpoint_saved_on_the_gpu_is_evaluated_on_a_machine_without_one(corpus, references, tmp_path):
    reference = references("zaremba")
    metrics = json.loads((reference / "metrics.json").read_text())
    result = run_script(  # no GPU visible in this process
        "evaluate.py", f"ckpt_path={metrics['best_checkpoint']}", *corpus, f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ppl = json.loads((tmp_path / "evaluation.json").read_text())["ppl"]
    # train.py's test ran with PyTorch's defaults, TF32 in cuDNN (10-bit mantissas); a mean over
    # 1.7k targets stays well inside 1e-3.
    assert ppl == pytest.approx(metrics["test_ppl"], rel=1e-3)


@pytest.fixture(scope="module")
def trained(corpus, references) -> dict:
    """The GPU reference run's best checkpoint and its corpus, as tests/test_adaptation.py takes them."""
    metrics = json.loads((references("zaremba") / "metrics.json").read_text())
    return {"ckpt": metrics["best_checkpoint"], "data": corpus}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["dynamic_eval.method=sgd", "dynamic_eval.lr=0.1"],
        ["dynamic_eval.method=rms", "dynamic_eval.lr=3e-5", "dynamic_eval.stats_batches=20"],
        ["cache.window=100", "cache.lambda=0.1", "cache.theta=0.3"],
        [
            "dynamic_eval.method=sgd",
            "dynamic_eval.lr=0.1",
            "cache.window=100",
            "cache.lambda=0.1",
            "cache.theta=0.3",
        ],
    ],
    ids=["plain", "dynamic_sgd", "dynamic_rms", "cache", "dynamic_sgd_and_cache"],
)
def test_evaluate_on_cuda_gives_the_cpus_perplexity(trained, tmp_path, ieee_float32, overrides):
    on = {
        device: run_evaluate(trained, tmp_path / device, f"device={device}", *overrides)
        for device in ("cpu", "cuda")
    }
    assert on["cuda"]["targets"] == on["cpu"]["targets"]
    # float32 against float64 on the CPU: 1e-8 for each pass, dynamic evaluation's steps included.
    assert on["cuda"]["ppl"] == pytest.approx(on["cpu"]["ppl"], rel=1e-5)
    assert on["cuda"]["acc"] == pytest.approx(on["cpu"]["acc"], abs=2 / on["cpu"]["targets"])  # near ties


@pytest.mark.parametrize("carry_state", [False, True])
def test_score_on_cuda_gives_the_cpus_log_probabilities(trained, tmp_path, ieee_float32, carry_state):
    file = tmp_path / "lines.txt"
    file.write_text("".join(f"{line}\n" for line in random_lines(30, 7)))
    on = {}
    for device in ("cpu", "cuda"):
        overrides = [f"ckpt_path={trained['ckpt']}", f"file={file}", f"carry_state={carry_state}"]
        on[device] = score(app_config("score", tmp_path / device, *overrides, f"device={device}"))
    cpu, cuda = ([line["log_prob"] for line in on[device]["lines"]] for device in ("cpu", "cuda"))
    # Lines of 4-13 targets, -32 at least: float32 against float64 on the CPU, 2.4e-7.
    assert cuda == pytest.approx(cpu, abs=2e-5)


def test_generate_on_cuda_writes_the_cpus_greedy_text_and_repeats_its_samples(
    trained, tmp_path, ieee_float32
):
    def text(device: str, name: str, *options: str) -> list[str]:
        overrides = [f"ckpt_path={trained['ckpt']}", "prompt=the cat", "num_words=30", f"device={device}"]
        return generate(app_config("generate", tmp_path / name, *overrides, *options))

    assert text("cuda", "greedy-cuda", "temperature=0") == text("cpu", "greedy-cpu", "temperature=0")
    sampled = ["temperature=0.8", "top_k=5", "num_samples=3", "seed=4"]
    first = text("cuda", "first", *sampled)
    assert first == text("cuda", "again", *sampled) and len(set(first)) == 3  # one seed, one text
