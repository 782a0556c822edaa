"""Test-time adaptation in evaluate.py: dynamic evaluation and the continuous cache score every
target exactly once, before anything has learnt from it, and reduce to plain evaluation when off."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from evaluate import evaluate
from lm import PROJECT_ROOT
from lm.errors import UserError
from lm.evaluation.cache import NeuralCache
from lm.evaluation.dynamic_eval import DynamicEvaluation, gradient_mean_squares
from lm.evaluation.scoring import score_stream
from lm.models.lstm import LSTMNetwork, LSTMOptions
from tests.conftest import run_script

CPU = torch.device("cpu")
VOCAB = 12


def network(tied: bool = False) -> LSTMNetwork:
    """A random network in float64, so that only real differences exceed 1e-12."""
    torch.manual_seed(0)
    net = LSTMNetwork(VOCAB, LSTMOptions(hidden_size=8, init_scale=0.5, tie_weights=tied))
    return net.double().eval()


@pytest.fixture
def net() -> LSTMNetwork:
    return network()


def token_ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def plain_log_probs(net: LSTMNetwork, ids: torch.Tensor) -> torch.Tensor:
    logits, _ = net(ids[:-1].view(1, -1))
    return F.log_softmax(logits[0], dim=-1).gather(1, ids[1:, None])[:, 0]


def rms_statistics(net: LSTMNetwork) -> list[torch.Tensor]:
    return gradient_mean_squares(net, token_ids(400, 9), batches=6, batch_size=4, num_steps=5, device=CPU)


DYNAMIC = {
    "sgd": {"method": "sgd", "lr": 0.5, "decay": 0.1, "segment_length": 5},
    "rms": {"method": "rms", "lr": 0.01, "decay": 0.1, "segment_length": 5, "eps": 1e-3},
}
CACHE = {"window": 7, "interpolation": 0.3, "theta": 2.0}


def adapted(net: LSTMNetwork, ids: torch.Tensor, dynamic: dict | None, cache: dict | None) -> torch.Tensor:
    """score_stream's log-probabilities with these options of DynamicEvaluation and NeuralCache."""
    adaptation = None
    if dynamic:
        mean_squares = rms_statistics(net) if dynamic["method"] == "rms" else None
        adaptation = DynamicEvaluation(net, **dynamic, mean_squares=mean_squares)
    memory = NeuralCache(**cache, size=net.output_size, device=CPU) if cache else None
    return score_stream(net, ids, CPU, chunk_length=10, dynamic=adaptation, cache=memory).log_probs


METHODS = {
    "sgd": (DYNAMIC["sgd"], None),
    "rms": (DYNAMIC["rms"], None),
    "cache": (None, CACHE),
    "sgd_and_cache": (DYNAMIC["sgd"], CACHE),
    "rms_and_cache": (DYNAMIC["rms"], CACHE),
}


@pytest.mark.parametrize("method", METHODS)
def test_no_target_is_looked_at_before_it_is_scored_and_each_is_scored_once(net, method):
    ids = token_ids(101, 1)
    scores = adapted(net, ids, *METHODS[method])
    assert scores.shape == (len(ids) - 1,) and torch.isfinite(scores).all()
    assert not torch.allclose(scores, plain_log_probs(net, ids))  # it adapts
    for k in (1, 5, 6, 23, 57, 100):  # segment and chunk edges, and the last token
        changed = ids.clone()
        changed[k] = (ids[k] + 1) % VOCAB  # target k - 1, and the input of the targets after it
        rescored = adapted(net, changed, *METHODS[method])
        assert torch.equal(rescored[: k - 1], scores[: k - 1])  # bit for bit
        assert rescored[k - 1] != scores[k - 1]
        if k < 90:  # and what it learnt from token k shows further on
            assert not torch.equal(rescored[k + 10 :], scores[k + 10 :])


def test_the_plain_pass_is_the_networks_log_probabilities_whatever_the_chunk(net):
    ids = token_ids(101, 6)
    for chunk_length in (1, 7, 200):
        scores = score_stream(net, ids, CPU, chunk_length)
        torch.testing.assert_close(scores.log_probs, plain_log_probs(net, ids), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["sgd", "rms"])
def test_dynamic_evaluation_with_lr_0_is_plain_evaluation_and_leaves_the_weights(net, method):
    ids = token_ids(101, 2)
    weights = [p.clone() for p in net.parameters()]
    options = {**DYNAMIC[method], "lr": 0.0}
    torch.testing.assert_close(
        adapted(net, ids, options, None), plain_log_probs(net, ids), rtol=0, atol=1e-12
    )
    adapted(net, ids, DYNAMIC[method], None)  # a real pass, then the trained weights are back
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights, strict=True))
    assert not net.embedding.sparse  # as trained: a sparse gradient only while adapting


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("method", ["sgd", "rms"])
def test_each_segment_is_scored_with_the_weights_the_earlier_segments_gave(method, decay, tied):
    """The rules of lm/evaluation/dynamic_eval.py, step by step on a copy of the network with dense gradients,
    three segments long: the sparse embedding step, the fused updates and the skipped decay
    change nothing."""
    net, ids, options = network(tied), token_ids(16, 3), {**DYNAMIC[method], "decay": decay}
    scores = adapted(net, ids, options, None)

    copy = network(tied)
    trained = [p.detach().clone() for p in copy.parameters()]
    if method == "rms":
        rms = [m.sqrt() for m in rms_statistics(net)]
        mean_rms = torch.cat([r.flatten() for r in rms]).mean()
        rates = [(decay * r / mean_rms).clamp(max=1) for r in rms]
        steps = [options["lr"] / (r + options["eps"]) for r in rms]
    else:
        rates, steps = [decay] * len(trained), [options["lr"]] * len(trained)
    state = None
    for start in range(0, 15, 5):
        x, y = ids[start : start + 5], ids[start + 1 : start + 6]
        logits, state = copy(x.view(1, -1), state)
        state = [(h.detach(), c.detach()) for h, c in state]
        expected = F.log_softmax(logits[0], dim=-1).gather(1, y[:, None])[:, 0]
        torch.testing.assert_close(scores[start : start + 5], expected.detach(), rtol=0, atol=1e-12)
        grads = torch.autograd.grad(F.cross_entropy(logits[0], y), list(copy.parameters()))
        with torch.no_grad():
            for p, p0, g, rate, step in zip(copy.parameters(), trained, grads, rates, steps, strict=True):
                p.copy_(p + rate * (p0 - p) - step * g)


def test_cache_with_lambda_0_is_plain_evaluation(net):
    ids = token_ids(101, 4)
    torch.testing.assert_close(
        adapted(net, ids, None, {**CACHE, "interpolation": 0.0}),
        plain_log_probs(net, ids),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("method", ["sgd", "rms"])
def test_both_together_reduce_to_each_alone(net, method):
    """With lr 0 the combination is the cache alone; with lambda 0 it is dynamic evaluation alone."""
    ids = token_ids(101, 7)
    torch.testing.assert_close(
        adapted(net, ids, {**DYNAMIC[method], "lr": 0.0}, CACHE),
        adapted(net, ids, None, CACHE),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        adapted(net, ids, DYNAMIC[method], {**CACHE, "interpolation": 0.0}),
        adapted(net, ids, DYNAMIC[method], None),
        rtol=0,
        atol=1e-12,
    )


def test_cache_probability_is_the_papers_mixture(net):
    """Grave et al.'s formula written out target by target, against the chunked computation."""
    ids, window, interpolation, theta = (
        token_ids(60, 5),
        CACHE["window"],
        CACHE["interpolation"],
        CACHE["theta"],
    )
    scores = adapted(net, ids, None, CACHE)
    features, _ = net.features(ids[:-1].view(1, -1))
    h, y = features[0], ids[1:]
    model_probs = F.softmax(net.decoder(h), dim=-1)
    for t in range(len(y)):
        past = range(max(t - window, 0), t)
        if not past:
            expected = model_probs[t, y[t]]
        else:
            weights = torch.stack([torch.exp(theta * h[t] @ h[i]) for i in past])
            cache = sum(w for w, i in zip(weights, past, strict=True) if y[i] == y[t]) / weights.sum()
            expected = (1 - interpolation) * model_probs[t, y[t]] + interpolation * cache
        torch.testing.assert_close(scores[t], torch.log(expected).detach(), rtol=0, atol=1e-12)


# --- evaluate.py -------------------------------------------------------------------------------


def run_evaluate(checkpoint: dict, out: Path, *overrides: str) -> dict:
    """evaluate.py's work in this process (a subprocess would spend seconds importing)."""
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            [f"ckpt_path={checkpoint['ckpt']}", *checkpoint["data"], *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    out.mkdir()
    result = evaluate(cfg)
    assert json.loads((out / "evaluation.json").read_text()) == result
    return result


def test_evaluate_runs_each_method_records_its_options_and_reduces_to_plain(checkpoint, tmp_path):
    plain = run_evaluate(checkpoint, tmp_path / "plain")
    assert plain["dynamic_eval"] is None and plain["cache"] is None
    targets = plain["targets"]
    runs = {
        "sgd_lr_0": ["dynamic_eval.method=sgd", "dynamic_eval.lr=0", "dynamic_eval.decay=0.5"],
        "cache_lambda_0": ["cache.window=50", "cache.lambda=0", "cache.theta=1"],
        "sgd": ["dynamic_eval.method=sgd", "dynamic_eval.lr=1", "dynamic_eval.decay=0.01"],
        "rms": ["dynamic_eval.method=rms", "dynamic_eval.lr=0.001", "dynamic_eval.stats_batches=10"],
        "cache": ["cache.window=50", "cache.lambda=0.1", "cache.theta=1"],
        "both": [
            "dynamic_eval.method=sgd",
            "dynamic_eval.lr=1",
            "cache.window=50",
            "cache.lambda=0.1",
            "cache.theta=1",
        ],
        "valid": ["split=valid", "cache.window=50", "cache.lambda=0.1", "cache.theta=1"],
    }
    results = {
        name: run_evaluate(checkpoint, tmp_path / name, *overrides) for name, overrides in runs.items()
    }
    for name in ("sgd_lr_0", "cache_lambda_0"):  # float32 network, other windows: rounding only
        assert results[name]["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
        assert results[name]["acc"] == pytest.approx(plain["acc"], rel=1e-6)  # a float32 mean
    for name in ("sgd", "rms", "cache", "both"):
        assert results[name]["targets"] == targets and results[name]["ppl"] != pytest.approx(plain["ppl"])
    assert len({results[name]["ppl"] for name in ("sgd", "cache", "both")}) == 3
    assert results["valid"]["split"] == "valid" and results["valid"]["targets"] != targets
    assert results["rms"]["dynamic_eval"] == {
        "method": "rms",
        "lr": 0.001,
        "decay": 0.0,
        "segment_length": 5,
        "eps": 2e-05,
        "stats_batches": 10,
        "stats_batch_size": 100,
        "stats_num_steps": 5,
    }
    assert results["sgd"]["dynamic_eval"] == {"method": "sgd", "lr": 1, "decay": 0.01, "segment_length": 5}
    assert results["cache"]["cache"] == {"window": 50, "lambda": 0.1, "theta": 1}
    assert results["both"]["dynamic_eval"]["method"] == "sgd" and results["both"]["cache"]["window"] == 50


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["dynamic_eval.method=adam"],
            "dynamic_eval.method='adam' is not allowed: it must be null, sgd or rms.",
        ),
        (
            ["dynamic_eval.method=sgd"],
            "dynamic_eval.lr has no value; dynamic_eval.method=sgd needs a step size",
        ),
        (
            ["dynamic_eval.method=sgd", "dynamic_eval.lr=-1"],
            "dynamic_eval.lr=-1 is not allowed: it must be null or a number, 0 or more.",
        ),
        (
            ["dynamic_eval.method=sgd", "dynamic_eval.lr=1", "dynamic_eval.decay=2"],
            "dynamic_eval.decay=2 is not allowed: it must be a number in [0, 1].",
        ),
        (
            ["dynamic_eval.method=rms", "dynamic_eval.lr=1", "dynamic_eval.eps=0"],
            "dynamic_eval.eps=0 is not allowed: it must be a number above 0.",
        ),
        (
            ["dynamic_eval.method=rms", "dynamic_eval.lr=1", "dynamic_eval.stats_batch_size=0"],
            "dynamic_eval.stats_batch_size=0 is not allowed: it must be an integer, 1 or more.",
        ),
        (["cache.window=100"], "cache.lambda has no value; cache.window=100 needs one"),
        (["cache.window=100"], "cache.theta has no value; cache.window=100 needs one"),  # both named
        (
            ["cache.window=0", "cache.lambda=0.1", "cache.theta=1"],
            "cache.window=0 is not allowed: it must be null or an integer, 1 or more.",
        ),
        (
            ["cache.window=100", "cache.lambda=1.5", "cache.theta=1"],
            "cache.lambda=1.5 is not allowed: it must be null or a number in [0, 1].",
        ),
        (
            ["cache.window=100", "cache.lambda=0.1", "cache.theta=-1"],
            "cache.theta=-1 is not allowed: it must be null or a number, 0 or more.",
        ),
        (["chunk_length=0"], "chunk_length=0 is not allowed: it must be an integer, 1 or more."),
        (
            ["dynamic_eval.method=sgd", "dynamic_eval.lr=1", "dynamic_eval.segment_length=0"],
            "dynamic_eval.segment_length=0 is not allowed: it must be an integer, 1 or more.",
        ),
    ],
)
def test_bad_options_are_one_clear_error(checkpoint, tmp_path, overrides, message):
    with pytest.raises(UserError) as error:
        run_evaluate(checkpoint, tmp_path / "run", *overrides)
    assert message in str(error.value)


def test_every_bad_option_is_named_at_once(checkpoint, tmp_path):
    with pytest.raises(UserError) as error:
        run_evaluate(
            checkpoint, tmp_path / "run", "dynamic_eval.method=adam", "cache.theta=-1", "chunk_length=0"
        )
    assert str(error.value).splitlines() == [
        "dynamic_eval.method='adam' is not allowed: it must be null, sgd or rms.",
        "cache.theta=-1 is not allowed: it must be null or a number, 0 or more.",
        "chunk_length=0 is not allowed: it must be an integer, 1 or more.",
    ]


def test_a_sweep_on_valid_writes_one_evaluation_per_run_and_the_report_ranks_them(checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script(
        "evaluate.py",
        "-m",
        f"ckpt_path={checkpoint['ckpt']}",
        *checkpoint["data"],
        "split=valid",
        "cache.window=50",
        "cache.theta=1",
        "cache.lambda=0,0.1,0.3",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = sorted(run for run in sweep.iterdir() if run.is_dir())
    for i, (run, value) in enumerate(zip(runs, ("0", "0.1", "0.3"), strict=True)):  # no checkpoint path
        assert run.name == f"{i}_cache.lambda={value},cache.theta=1,cache.window=50,split=valid"
    evaluations = {run.name.split("_")[0]: json.loads((run / "evaluation.json").read_text()) for run in runs}
    assert {e["split"] for e in evaluations.values()} == {"valid"}
    assert [e["cache"]["lambda"] for e in evaluations.values()] == [0, 0.1, 0.3]

    table = tmp_path / "sweep.csv"
    report = subprocess.run(
        [sys.executable, "-m", "lm.tools.report", str(sweep), "--csv", str(table)],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader(table.open()))
    assert [float(row["ppl"]) for row in rows] == sorted(e["ppl"] for e in evaluations.values())  # best first
    for row in rows:
        assert (
            row["split"] == "valid"
            and row["overrides"] == f"cache.lambda={evaluations[row['run']]['cache']['lambda']}"
        )
        assert float(row["ppl"]) == evaluations[row["run"]]["ppl"]
    assert report.stdout.splitlines()[0].split() == [
        "run",
        "overrides",
        "status",
        "split",
        "ppl",
        "acc",
        "targets",
        "wall_min",
    ]


def test_a_non_finite_option_or_result_is_refused_and_the_json_stays_json(checkpoint, tmp_path):
    with pytest.raises(
        UserError, match=r"dynamic_eval.lr=inf is not allowed: it must be null or a number, 0 or more"
    ):
        run_evaluate(checkpoint, tmp_path / "inf", "dynamic_eval.method=sgd", "dynamic_eval.lr=inf")
    # Finite weights (NaN ones are refused at load: tests/test_apps.py) whose log-probabilities are
    # thousands of nats per target: exp of that is beyond a float, where math.exp would raise.
    huge = torch.load(checkpoint["ckpt"], map_location="cpu", weights_only=True)
    huge["state_dict"]["net.decoder.weight"] *= 1e6
    torch.save(huge, tmp_path / "huge.ckpt")
    with pytest.raises(UserError, match=r"The perplexity is not finite \(inf; null in "):
        run_evaluate({**checkpoint, "ckpt": tmp_path / "huge.ckpt"}, tmp_path / "huge")

    def no_constant(name: str):
        raise AssertionError(f"{name} in evaluation.json: not JSON")

    written = json.loads((tmp_path / "huge" / "evaluation.json").read_text(), parse_constant=no_constant)
    assert written["ppl"] is None and written["targets"] > 0
