"""The adaptive softmax (Grave et al. 2017, `model.net.softmax=adaptive`): its per-target log-probabilities
are the distribution's, the distribution sums to 1, perplexities stay exact, every tool reads its
checkpoints, bad options are one line, and the full softmax keeps every bit of its numbers."""

import json
import math
import random
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from lm.data.datamodule import PTBDataModule
from lm.evaluation.loading import load_model
from lm.models.lstm import LSTMNetwork, LSTMOptions
from lm.models.network import network_problems
from lm.training.metrics import negated_sum, summed_nll
from tests.conftest import (
    TINY_RUN,
    compose_config,
    language_model,
    quiet_trainer,
    run_script,
    run_train,
    write_corpus,
)
from tests.test_adaptation import run_evaluate

VOCAB, CUTOFFS = 40, [8, 20]  # a head of 8 words and 2 clusters, of 12 and 20 words


def adaptive_net(**options) -> LSTMNetwork:
    torch.manual_seed(0)
    return LSTMNetwork(
        VOCAB, LSTMOptions(hidden_size=16, init_scale=0.5, softmax="adaptive", cutoffs=CUTOFFS, **options)
    ).eval()  # tails of 16 // 4 and 16 // 16 units


def inputs_and_targets(batch: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randint(VOCAB, (2, batch, steps), generator=generator)
    edges = torch.tensor([0, 7, 8, 19, 20, 39])  # the first and last id of the head and of each cluster
    y.view(-1)[: len(edges)] = edges[: y.numel()]
    return x, y


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_target_log_probs_are_the_normalised_distribution_at_the_targets(dtype, tolerance):
    net = adaptive_net().to(dtype)
    x, y = inputs_and_targets(3, 25, 1)
    features, _ = net.features(x)
    distribution = net.logits(features)
    assert distribution.shape == (3, 25, VOCAB)
    total = distribution.double().exp().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=tolerance)  # sums to 1

    log_probs = net.target_log_probs(features, y)
    at_targets = distribution.gather(2, y[..., None])[..., 0]
    torch.testing.assert_close(log_probs, at_targets, rtol=0, atol=tolerance)
    assert log_probs.double().sum().item() == pytest.approx(at_targets.double().sum().item(), rel=tolerance)
    evaluated, likeliest = net.evaluate_targets(features, y)
    assert torch.equal(evaluated, log_probs) and torch.equal(likeliest, distribution.argmax(-1))


@pytest.mark.parametrize("cluster_bias", [-50.0, 0.0, 50.0])  # the head's best: a word, either, a cluster
def test_the_likeliest_token_is_the_distributions_argmax_wherever_the_heads_best_points(cluster_bias):
    net = adaptive_net().double()
    with torch.no_grad():
        net.adaptive_softmax.head.bias[CUTOFFS[0] :] += cluster_bias
    x, y = inputs_and_targets(4, 30, 2)
    features, _ = net.features(x)
    distribution = net.logits(features)
    head_best = net.adaptive_softmax.head(features).argmax(-1) >= CUTOFFS[0]
    share = head_best.double().mean().item()
    assert {-50.0: share == 0, 0.0: 0 < share < 1, 50.0: share == 1}[cluster_bias]  # each branch of predict
    assert torch.equal(net.evaluate_targets(features, y)[1], distribution.argmax(-1))


def test_a_window_of_one_target_is_scored():  # the last, shorter window of a split can be one token
    net = adaptive_net().double()
    for target in (3, 12, 30):
        features, _ = net.features(torch.tensor([[5]]))
        log_probs = net.target_log_probs(features, torch.tensor([[target]]))
        assert log_probs.shape == (1, 1)
        assert log_probs.item() == pytest.approx(net.logits(features)[0, 0, target].item(), abs=1e-12)


def test_under_autocast_the_adaptive_softmax_runs_in_its_weights_dtype():
    net = adaptive_net()
    x, y = inputs_and_targets(2, 10, 3)
    features, _ = net.features(x)
    plain = net.target_log_probs(features, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # trainer.precision=bf16-mixed
        mixed = net.target_log_probs(features, y)
        distribution = net.logits(features)
    assert mixed.dtype == distribution.dtype == torch.float32 and torch.equal(mixed, plain)


def test_init_uniform_draws_every_weight_and_awd_zeroes_the_bias():
    scale = 0.05
    adaptive = {"hidden_size": 16, "init_scale": scale, "softmax": "adaptive", "cutoffs": CUTOFFS}
    uniform = LSTMNetwork(VOCAB, LSTMOptions(**adaptive))
    awd = LSTMNetwork(VOCAB, LSTMOptions(**adaptive, init="awd"))
    for net in (uniform, awd):
        weights = [p for name, p in net.adaptive_softmax.named_parameters() if not name.endswith("bias")]
        assert len(weights) == 5 and all(p.abs().max() <= scale and p.abs().min() > 0 for p in weights)
    bias = uniform.adaptive_softmax.head.bias  # 8 words and 2 clusters
    assert len(bias) == 10 and bias.abs().max() <= scale and bias.count_nonzero() == 10
    assert awd.adaptive_softmax.head.bias.count_nonzero() == 0


def test_the_full_softmax_sums_exactly_as_before():
    """Today's loss was F.cross_entropy(decoder(features), y, reduction="sum"); the per-target path
    gives the same bits, value and gradient (a plain .sum() of the per-target values would not)."""
    torch.manual_seed(0)
    net = LSTMNetwork(1000, LSTMOptions(hidden_size=32))
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        features = torch.randn(20, 20, 32, generator=generator) * 3
        y = torch.randint(1000, (20, 20), generator=generator)
        before = F.cross_entropy(net.decoder(features).flatten(0, 1), y.flatten(), reduction="sum")
        now = summed_nll(net, features, y)
        assert torch.equal(now, before)
        log_probs, likeliest = net.evaluate_targets(features, y)
        assert torch.equal(negated_sum(log_probs), before)
        assert torch.equal(likeliest, net.decoder(features).argmax(-1))
        old_grad = torch.autograd.grad(before / 20, net.decoder.weight)[0]
        assert torch.equal(torch.autograd.grad(now / 20, net.decoder.weight)[0], old_grad)
    x = torch.randint(1000, (3, 7))
    assert torch.equal(net(x)[0], net.decoder(net.features(x)[0]))


def test_test_perplexity_equals_a_token_by_token_batch_1_loop(tiny_corpus, tmp_path):
    datamodule = PTBDataModule(
        dir=tiny_corpus, cache_dir=tmp_path / "cache", url="file:///x", test_num_steps=37
    )
    torch.manual_seed(0)
    model = language_model(
        datamodule.vocab_size, hidden_size=16, init_scale=0.3, softmax="adaptive", cutoffs=[4, 8]
    )
    (result,) = quiet_trainer().test(model, datamodule=datamodule, verbose=False)

    ids = torch.as_tensor(datamodule.corpus.splits["test"]).long()
    model.eval()
    total, correct, state = 0.0, 0, None
    with torch.no_grad():
        for t in range(len(ids) - 1):
            log_probs, state = model.net(ids[t].view(1, 1), state)  # the whole distribution
            total += log_probs.view(-1).double()[ids[t + 1]].item()
            correct += int(log_probs.view(-1).argmax() == ids[t + 1])
    targets = len(ids) - 1
    assert result["test/ppl"] == pytest.approx(math.exp(-total / targets), rel=1e-6)
    assert result["test/acc"] == pytest.approx(correct / targets, rel=1e-6)


# --- train.py, evaluate.py, score.py, generate.py ---------------------------------------------


def counting_lines(count: int, seed: int) -> list[str]:
    """Lines of 3-12 consecutive words of a ring of 60 (w05 w06 w07 ...): learnable, unlike random words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        start, length = rng.randrange(60), rng.randint(3, 12)
        lines.append(" ".join(f"w{(start + i) % 60:02d}" for i in range(length)))
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adaptive")
    corpus = write_corpus(
        root / "counting",
        {"train": counting_lines(2000, 0), "valid": counting_lines(200, 1), "test": counting_lines(200, 2)},
    )
    data = [f"data.dir={corpus}", f"data.cache_dir={root / 'cache'}"]
    run = [*TINY_RUN, "model.net.hidden_size=64", "model.net.init_scale=0.3", "trainer.max_epochs=4"]
    adaptive = ["model.net.softmax=adaptive", "model.net.cutoffs=[10,30]"]
    result = run_train(*run, *adaptive, *data, f"hydra.run.dir={root / 'run'}")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    return {
        "root": root,
        "corpus": corpus,
        "data": data,
        "metrics": metrics,
        "ckpt": metrics["best_checkpoint"],
    }


def test_train_learns_and_the_checkpoint_keeps_the_options(trained):
    metrics = trained["metrics"]
    model = load_model(trained["ckpt"])
    assert len(model.vocabulary) == 62  # 60 words, <eos>, <unk>
    assert metrics["status"] == "completed" and metrics["val_ppl"] < 62 / 4  # uniform would be 62
    options = torch.load(trained["ckpt"], weights_only=True)["hyper_parameters"]["net"]
    cutoffs = options["cutoffs"]  # a ListConfig from Hydra, saved as a list
    assert type(cutoffs) is list and cutoffs == [10, 30] and options["softmax"] == "adaptive"
    assert model.net.decoder is None and model.net.adaptive_softmax.cutoffs == [10, 30, 62]


def test_evaluate_and_score_give_the_perplexity_train_reported(trained, tmp_path):
    result = run_script(
        "evaluate.py", f"ckpt_path={trained['ckpt']}", *trained["data"], f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    evaluation = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert evaluation["ppl"] == pytest.approx(trained["metrics"]["test_ppl"], rel=1e-9)

    # score.py over the lines of the file, evaluate.py over the whole file: one stream either way.
    text = trained["corpus"] / "ptb.test.txt"
    scored = run_script(
        "score.py",
        f"ckpt_path={trained['ckpt']}",
        f"file={text}",
        "carry_state=true",
        "format=json",
        f"output={tmp_path / 'scores.json'}",
        f"hydra.run.dir={tmp_path / 's'}",
    )
    assert scored.returncode == 0, scored.stdout + scored.stderr
    total = json.loads((tmp_path / "scores.json").read_text())["total"]
    on_file = run_evaluate(trained, tmp_path / "f", f"file={text}")
    assert total["targets"] == on_file["targets"] == evaluation["targets"] + 1  # and the first word
    assert total["ppl"] == pytest.approx(on_file["ppl"], rel=1e-6)


def test_greedy_generation_counts_on_and_gives_the_same_text_twice(trained, tmp_path):
    texts = []
    for run in ("a", "b"):
        result = run_script(
            "generate.py",
            f"ckpt_path={trained['ckpt']}",
            "prompt=w05",
            "temperature=0",
            "num_words=12",
            f"hydra.run.dir={tmp_path / run}",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        texts.append((tmp_path / run / "samples.txt").read_text())
    assert texts[0] == texts[1]
    words = texts[0].split("\n", 1)[1].split()  # the prompt and 12 words; <eos> is a line break
    follows = [f"w{(int(word[1:]) + 1) % 60:02d}" == after for word, after in pairwise(words)]
    assert words[0] == "w05" and len(follows) == 12 and sum(follows) >= 8  # the ring, learnt


def test_the_cache_and_dynamic_evaluation_adapt_and_reduce_to_plain(trained, tmp_path):
    plain = run_evaluate(trained, tmp_path / "plain")["ppl"]
    runs = {
        "cache": (["cache.window=50", "cache.lambda=0.1", "cache.theta=1"], False),
        "cache_lambda_0": (["cache.window=50", "cache.lambda=0", "cache.theta=1"], True),
        "sgd": (["dynamic_eval.method=sgd", "dynamic_eval.lr=0.1"], False),
        "sgd_lr_0": (["dynamic_eval.method=sgd", "dynamic_eval.lr=0"], True),
        "rms": (["dynamic_eval.method=rms", "dynamic_eval.lr=1e-4", "dynamic_eval.stats_batches=5"], False),
    }
    for name, (overrides, same) in runs.items():
        ppl = run_evaluate(trained, tmp_path / name, *overrides)["ppl"]
        assert math.isfinite(ppl) and (ppl == pytest.approx(plain, rel=1e-5)) == same, (name, ppl, plain)


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "vocab_size", "message"),
    [
        (
            ["model.net.softmax=adaptive", "model.net.cutoffs=[2000,5000]", "model.net.tie_weights=true"],
            None,
            "model.net.tie_weights=true is not allowed with model.net.softmax=adaptive: its projections "
            "cannot share the embedding matrix",
        ),
        (
            ["model.net.softmax=adaptive", "model.net.cutoffs=[5000,2000]"],
            None,
            "model.net.cutoffs=[5000, 2000] is not allowed: it must be a strictly increasing list of "
            "integers",
        ),
        (
            ["model.net.softmax=adaptive", "model.net.cutoffs=[2000,2000]"],
            None,
            "model.net.cutoffs=[2000, 2000] is not allowed: it must be a strictly increasing list",
        ),
        (
            ["model.net.softmax=adaptive"],
            None,
            "model.net.cutoffs=None is not allowed: it must be a strictly",
        ),
        (
            ["model.net.softmax=adaptive", "model.net.cutoffs=[2000,10000]"],
            10000,
            "model.net.cutoffs=[2000, 10000] is not allowed: it must be a strictly increasing list of "
            "integers, each 1 or more and below the vocabulary size (10000), such as [2000,5000].",
        ),
        (
            ["model.net.cutoffs=[2000,5000]"],
            None,
            "model.net.cutoffs=[2000, 5000] is not allowed: it must be null with model.net.softmax=full; set "
            "model.net.softmax=adaptive to use them.",
        ),
        (
            ["model.net.softmax=sampled"],
            None,
            "model.net.softmax='sampled' is not allowed: it must be full or adaptive.",
        ),
        (
            ["model.net.softmax=adaptive", "model.net.cutoffs=[2000]", "model.net.div_value=0"],
            None,
            "model.net.div_value=0 is not allowed: it must be a number above 0.",
        ),
        (
            ["model.net.softmax=adaptive", "model.net.cutoffs=[10,20,30,40]"],
            None,
            "model.net.div_value=4.0 leaves the last of 4 tail clusters no projection "
            "(model.net.hidden_size 200",
        ),
    ],
)
def test_a_bad_softmax_option_is_one_line_naming_the_key(overrides, vocab_size, message):
    lines = network_problems(compose_config(*overrides).model.net, vocab_size)
    assert any(message in line for line in lines), lines


def test_train_refuses_a_cutoff_beyond_the_vocabulary_in_one_line(tiny_corpus, tmp_path):
    result = run_train(
        *TINY_RUN,
        "model.net.softmax=adaptive",
        "model.net.cutoffs=[4,12]",
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "model.net.cutoffs=[4, 12] is not allowed: it must be a strictly increasing list of integers, "
        "each 1 or more and below the vocabulary size (12)" in result.stdout
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_the_default_is_the_full_softmax():
    model = compose_config().model
    assert (model.net.softmax, model.net.cutoffs, model.net.div_value) == ("full", None, 4.0)
    assert isinstance(language_model(12).net.decoder, torch.nn.Linear)
