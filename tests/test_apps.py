"""evaluate.py, generate.py and score.py on a model trained by train.py on a text folder."""

import csv
import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from evaluate import evaluation_device
from lm import PROJECT_ROOT
from lm.errors import UserError
from lm.evaluation.generation import sample
from lm.models.lstm import LSTMNetwork, LSTMOptions
from score import score
from tests.conftest import run_script
from tests.test_adaptation import run_evaluate
from tests.test_gpu import app_config


def test_evaluate_gives_the_test_perplexity_train_reported(trained):
    out = trained["root"] / "evaluate"
    result = run_script(
        "evaluate.py", f"ckpt_path={trained['ckpt']}", *trained["data"], f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["ppl"] == pytest.approx(trained["metrics"]["test_ppl"], rel=1e-9)
    lines = (trained["text"] / "test.txt").read_text().splitlines()
    assert (
        evaluation["targets"] == sum(len(line.split()) + 1 for line in lines) - 1
    )  # words and <eos>s, less one


def test_evaluate_refuses_data_whose_vocabulary_the_model_does_not_have(trained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"{split}.txt").write_text("some other words\n" * 30)
    result = run_script(
        "evaluate.py",
        f"ckpt_path={trained['ckpt']}",
        "data=text",
        f"data.dir={other}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert (
        f"The checkpoint's vocabulary (12 word tokens) is not the one of data.dir={other} (5)"
        in result.stdout
    )


@pytest.mark.parametrize(
    ("script", "overrides", "lines"),
    [
        (
            "generate.py",
            ["prompt=the", "num_words=-1", "temperature=0.0001", f"seed={2**80}"],
            [
                "num_words=-1 is not allowed: it must be an integer, 0 or more.",
                "temperature=0.0001 is not allowed: it must be a number: 0 (greedy) or at least 0.001.",
                f"seed={2**80} is not allowed: it must be an integer in [0, 4294967295].",  # train.py's range
            ],
        ),
        (
            "evaluate.py",
            ["data.eval_batch_size=abc", "split=dev"],
            [
                "data.eval_batch_size='abc' is not allowed: it must be an integer, 1 or more.",
                "split='dev' is not allowed: it must be test, valid or train.",
            ],
        ),
        (
            "score.py",
            ["file=/nonexistent.txt", "carry_state=yes", "format=csv"],
            [
                "carry_state='yes' is not allowed: it must be true or false.",
                "format='csv' is not allowed: it must be tsv or json.",
            ],
        ),
    ],
)
def test_the_tools_name_every_bad_option_before_loading_the_model(tmp_path, script, overrides, lines):
    result = run_script(script, "ckpt_path=/nonexistent.ckpt", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    for line in lines:
        assert line in result.stdout, result.stdout


def test_line_scores_add_up_to_the_log_probability_of_the_file(trained, tmp_path):
    file = tmp_path / "sentences.txt"
    file.write_text("the cat sat on the mat\na zebra\n\nred red red\n")
    evaluated = run_script(
        "evaluate.py", f"ckpt_path={trained['ckpt']}", f"file={file}", f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert "1 token types of" in evaluated.stdout and "zebra" in evaluated.stdout  # counted as <unk>
    evaluation = json.loads((tmp_path / "e" / "evaluation.json").read_text())

    carried = run_script(
        "score.py",
        f"ckpt_path={trained['ckpt']}",
        f"file={file}",
        "carry_state=true",
        "format=json",
        f"output={tmp_path / 'carried.json'}",
        f"hydra.run.dir={tmp_path / 's'}",
    )
    assert carried.returncode == 0, carried.stdout + carried.stderr
    scores = json.loads((tmp_path / "carried.json").read_text())
    assert [line["targets"] for line in scores["lines"]] == [7, 3, 1, 4]  # words + <eos>
    assert sum(line["log_prob"] for line in scores["lines"]) == pytest.approx(scores["total"]["log_prob"])
    assert scores["total"]["targets"] == evaluation["targets"] == 15
    assert scores["total"]["ppl"] == pytest.approx(evaluation["ppl"], rel=1e-6)

    fresh = run_script(
        "score.py", f"ckpt_path={trained['ckpt']}", f"file={file}", f"hydra.run.dir={tmp_path / 'f'}"
    )
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    rows = list(csv.DictReader((tmp_path / "f" / "scores.tsv").open(), delimiter="\t"))
    assert [row["text"] for row in rows] == file.read_text().splitlines()
    assert (
        rows[0]["log_prob"] == f"{scores['lines'][0]['log_prob']:.6f}"
    )  # the first line: a fresh state either way
    assert rows[1]["log_prob"] != f"{scores['lines'][1]['log_prob']:.6f}"  # later ones: context or none
    for row in rows:
        assert float(row["ppl"]) == pytest.approx(
            math.exp(-float(row["log_prob"]) / int(row["targets"])), rel=1e-4
        )


@pytest.mark.parametrize("script, argument", [("score.py", "file="), ("generate.py", "prompt=the")])
def test_scoring_and_generating_start_without_lightning(trained, tmp_path, script, argument):
    """Lightning's import is some 2.5 s of a 4 s start here, and using a trained model needs none of it:
    the configuration and the checkpoint are read without it."""
    if argument == "file=":
        argument += str(trained["text"] / "valid.txt")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}  # -X importtime: each import, to stderr
    result = run_script(
        script, f"ckpt_path={trained['ckpt']}", argument, f"hydra.run.dir={tmp_path}", env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    imported = {
        line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if "import time:" in line
    }
    assert "torch" in imported and "hydra" in imported
    assert not {name for name in imported if name.startswith(("lightning", "pytorch_lightning"))}


def generated(trained, tmp_path, *overrides) -> tuple[list[str], str]:
    result = run_script(
        "generate.py", f"ckpt_path={trained['ckpt']}", f"hydra.run.dir={tmp_path}", *overrides
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return (tmp_path / "samples.txt").read_text().split("--- sample ")[1:], result.stdout


def test_generation_is_reproducible_and_batched_and_reads_unknown_words_as_unk(trained, tmp_path):
    options = ["prompt=the cat zebra", "num_words=60", "num_samples=3", "top_k=5", "temperature=0.8"]
    (first, log), (again, _) = (
        generated(trained, tmp_path / "a", *options),
        generated(trained, tmp_path / "b", *options),
    )
    assert first == again and len(first) == 3 and len(set(first)) == 3
    assert all(sample.startswith(f"{i + 1}\nthe cat zebra") for i, sample in enumerate(first))
    assert "Not in the model's vocabulary, read as <unk>: zebra" in log
    assert all("<eos>" not in sample and sample.count("\n") > 3 for sample in first)  # lines of 3-12 words


def test_temperature_zero_is_greedy(trained, tmp_path):
    greedy, _ = generated(trained, tmp_path, "prompt=the", "temperature=0", "num_samples=2", "num_words=20")
    assert greedy[0].split("\n", 1)[1] == greedy[1].split("\n", 1)[1]


def test_sampling_stays_within_the_top_k_tokens():
    torch.manual_seed(0)
    net = LSTMNetwork(50, LSTMOptions(hidden_size=16, init_scale=1.0)).eval()
    prompt = torch.tensor([3, 1, 4])
    words = sample(
        net,
        prompt,
        num_words=40,
        num_samples=4,
        temperature=2.0,
        top_k=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert words.shape == (4, 40)
    for row in words:
        logits, _ = net(torch.cat([prompt, row[:-1]]).view(1, -1))
        top = logits[0, len(prompt) - 1 :].topk(3, dim=-1).indices
        assert (top == row.view(-1, 1)).any(dim=1).all()
    assert torch.equal(sample(net, prompt, 40, 4, 0.0), sample(net, prompt, 40, 4, 5.0, top_k=1))  # greedy
    assert not torch.equal(words, sample(net, prompt, 40, 4, 2.0, 3, torch.Generator().manual_seed(1)))
    unrestricted = sample(net, prompt, 40, 4, 2.0, None, torch.Generator().manual_seed(0))
    logits, _ = net(torch.cat([prompt.expand(4, -1), unrestricted[:, :-1]], dim=1))
    ranks = (
        logits[:, len(prompt) - 1 :] > logits[:, len(prompt) - 1 :].gather(2, unrestricted.unsqueeze(2))
    ).sum(2)
    assert (ranks >= 3).any()  # without top_k, a hot sample leaves the top 3: the test above can fail


def test_a_huge_temperature_samples_uniformly_among_the_top_k():
    torch.manual_seed(0)
    net = LSTMNetwork(50, LSTMOptions(hidden_size=16, init_scale=1.0)).eval()
    prompt = torch.tensor([3, 1, 4])
    # 1e300 is inf in float32: every logit over it is 0, where a masked -inf over it would be NaN.
    words = sample(net, prompt, 1, 3000, 1e300, top_k=3, generator=torch.Generator().manual_seed(0))
    logits, _ = net(prompt.view(1, -1))
    top = logits[0, -1].topk(3).indices
    counts = torch.bincount(words.view(-1), minlength=50)
    assert set(counts.nonzero().view(-1).tolist()) == set(top.tolist())
    assert counts[top].min() > 900  # about 1000 each of 3000


NAN_WEIGHT = "net.rnns.0.weight_hh_l0"


@pytest.fixture(scope="module")
def nan_checkpoint(trained) -> Path:
    """The trained checkpoint with one weight NaN (train.py saves none: an altered file may hold it)."""
    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    checkpoint["state_dict"][NAN_WEIGHT][0, 0] = math.nan
    path = trained["root"] / "nan.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("script", "option", "output"),
    [
        ("generate.py", "prompt=the", "samples.txt"),
        ("score.py", "file=", "scores.tsv"),
        ("evaluate.py", "file=", "evaluation.json"),
    ],
)
def test_weights_that_are_not_finite_are_one_line_before_any_pass(
    trained, nan_checkpoint, tmp_path, script, option, output
):
    option += str(trained["text"] / "test.txt") if option == "file=" else ""
    result = run_script(script, f"ckpt_path={nan_checkpoint}", option, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    message = f"ckpt_path={nan_checkpoint} holds weights that are not finite (NaN or inf in {NAN_WEIGHT})"
    assert message in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / output).exists()


@pytest.mark.parametrize("script", ["evaluate.py", "generate.py", "score.py"])
def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, script):
    (tmp_path / "a-file").write_text("a regular file")  # root writes through chmod; not under a file
    run = tmp_path / "a-file" / "run"
    result = run_script(script, "ckpt_path=/nonexistent.ckpt", f"hydra.run.dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert (
        f"hydra.run.dir={run} cannot be written ({tmp_path / 'a-file'} is a file, not a folder): "
        "give hydra.run.dir a folder you can write." in output
    )
    assert "Traceback" not in output


@pytest.mark.parametrize("case", ["a folder", "a path under a file", "the scored file"])
def test_score_refuses_an_output_it_cannot_write_before_scoring(trained, tmp_path, case):
    scored = tmp_path / "sentences.txt"
    scored.write_text("the cat sat\n")
    (tmp_path / "a-file").write_text("kept")
    output, reason = {
        "a folder": (tmp_path, "is a folder, not a file"),
        "a path under a file": (
            tmp_path / "a-file" / "scores.tsv",
            f"cannot be written ({tmp_path / 'a-file'} is a file, not a folder)",
        ),
        "the scored file": (scored, "is the file being scored, which writing would replace"),
    }[case]
    result = run_script(
        "score.py",
        f"ckpt_path={trained['ckpt']}",
        f"file={scored}",
        f"output={output}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert (
        f"output={output} {reason}: give output a file path in a folder you can write, or leave it out"
        in result.stdout
    ), result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert scored.read_text() == "the cat sat\n" and (tmp_path / "a-file").read_text() == "kept"


def scored(trained: dict) -> list[str]:
    """score.py's options for the trained model's test text, to run in this process (app_config)."""
    return [f"ckpt_path={trained['ckpt']}", f"file={trained['text'] / 'test.txt'}"]


def test_score_refuses_an_unwritable_output_before_scoring(trained, tmp_path, monkeypatch):
    out = tmp_path / "read-only" / "scores.tsv"
    out.parent.mkdir()
    # What a user without write permission sees there (root writes through chmod: no such folder for it).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out.parent and real_access(path, mode))
    monkeypatch.setattr("score.LanguageModel.load", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(UserError) as error:
        score(app_config("score", tmp_path / "run", *scored(trained), f"output={out}"))
    assert str(error.value) == (
        f"output={out} cannot be written ({out.parent} is not writable): give output a file path in a "
        "folder you can write, or leave it out (the run folder)."
    )


def test_a_failed_write_is_one_line_and_keeps_the_earlier_scores(trained, tmp_path, monkeypatch):
    out = tmp_path / "scores" / "scores.tsv"
    out.parent.mkdir()
    out.write_text("earlier scores")
    real_write = Path.write_text

    def disk_fills(path: Path, text: str, *args, **kwargs):  # mid-write, next to the output only
        if path.parent != out.parent:
            return real_write(path, text, *args, **kwargs)
        real_write(path, text[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", disk_fills)
    with pytest.raises(UserError) as error:
        score(app_config("score", tmp_path / "run", *scored(trained), f"output={out}"))
    assert str(error.value).startswith(f"output={out} cannot be written (No space left on device): ")
    assert out.read_text() == "earlier scores" and list(out.parent.iterdir()) == [out]


def test_score_refuses_an_empty_file_and_writes_nothing(trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_script(
        "score.py",
        f"ckpt_path={trained['ckpt']}",
        f"file={empty}",
        f"output={tmp_path / 'out' / 'scores.tsv'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert f"file={empty} holds no token to score" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists() and not list((tmp_path / "run").glob("scores.*"))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["dynamic_eval.method=sgd", "dynamic_eval.lr=0"],
        ["cache.window=50", "cache.lambda=0", "cache.theta=1"],
    ],
    ids=["plain", "dynamic_eval", "cache"],
)
def test_every_evaluate_pass_runs_on_device_cpu(trained, tmp_path, overrides):
    evaluation = run_evaluate(trained, tmp_path / "run", "device=cpu", *overrides)  # in this process
    assert evaluation["ppl"] == pytest.approx(trained["metrics"]["test_ppl"], rel=1e-5)  # lr 0, lambda 0


@pytest.mark.parametrize(
    ("script", "overrides", "message"),
    [
        ("evaluate.py", ["device=cuda"], "device=cuda asks for a GPU PyTorch does not see (0); use cpu."),
        ("evaluate.py", ["trainer.gpus=1"], "trainer.gpus=1 asks for a GPU but PyTorch sees none"),
        ("evaluate.py", ["trainer.gpus=1", "device=cpu"], "trainer.gpus=1 and device=cpu conflict"),
        ("generate.py", ["device=cuda"], "device=cuda asks for a GPU PyTorch does not see (0); use cpu."),
        ("score.py", ["device=cuda", "file=x.txt"], "device=cuda asks for a GPU PyTorch does not see"),
    ],
)
def test_a_gpu_that_is_not_there_is_one_line_for_each_tool(trained, tmp_path, script, overrides, message):
    result = run_script(script, f"ckpt_path={trained['ckpt']}", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert message in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("overrides", "gpu"),
    [([], 0), (["device=cuda"], 0), (["trainer.gpus=1"], 0), (["device=cuda:1"], 1), (["device=cpu"], None)],
)
def test_every_pass_of_evaluate_gets_one_device(monkeypatch, overrides, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", ["ckpt_path=unused", *overrides])
    device = evaluation_device(cfg)  # what every pass runs on
    if gpu is None:
        assert device == torch.device("cpu")
    else:
        assert device.type == "cuda" and (device.index or 0) == gpu
