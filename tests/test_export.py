"""The model folder, the Python API and ONNX (python -m lm.tools.export; docs/export.md): a model
trained by train.py gives the same numbers through every way out of the lab."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from evaluate import evaluate
from generate import generate
from lm import PROJECT_ROOT
from lm.api import LanguageModel
from lm.data.text import EOS, Tokenizer
from lm.data.vocabulary import Vocabulary
from lm.errors import UserError
from lm.evaluation.loading import load_model
from lm.evaluation.model_folder import TrainedModel
from lm.evaluation.scoring import score_stream, text_ids
from lm.models.network import build_network
from lm.tools import bench_onnx
from lm.tools.export import export, model_card
from lm.tools.onnx_export import OnnxScorer, onnx_model
from score import score
from tests.conftest import app_config


@pytest.fixture(scope="module")
def exported(trained) -> dict:
    """conftest's model trained by train.py, and its export with ONNX and int8."""
    ckpt = Path(trained["ckpt"])
    folder = run_export(
        trained["root"] / "export-run", ckpt, trained["root"] / "model", "onnx=true", "int8=true"
    )
    return {**trained, "ckpt": ckpt, "folder": folder}


def run_export(run: Path, ckpt: Path, out: Path, *overrides: str) -> Path:
    return export(app_config("export", run, f"ckpt_path={ckpt}", f"out={out}", *overrides))


def test_the_folder_holds_plain_files_and_a_card_with_the_runs_figures(exported):
    folder, metrics = exported["folder"], exported["metrics"]
    names = {"config.json", "model.safetensors", "vocab.txt", "README.md", "model.onnx", "model.int8.onnx"}
    assert {path.name for path in folder.iterdir()} == names
    config = json.loads((folder / "config.json").read_text())
    assert config["network"]["_target_"] == "lm.models.lstm.LSTMOptions"
    assert config["network"]["hidden_size"] == 16
    assert config["origin"]["test_ppl"] == metrics["test_ppl"]
    vocabulary = load_model(exported["ckpt"]).vocabulary
    assert (folder / "vocab.txt").read_text().splitlines() == vocabulary.tokens
    card = (folder / "README.md").read_text()
    assert f"| test perplexity | {metrics['test_ppl']:.2f} |" in card
    assert f"| validation perplexity | {metrics['val_ppl']:.2f} |" in card
    assert "`python train.py model.net.hidden_size=16" in card
    assert "A word-level recurrent language model" in card
    chars = TrainedModel(load_model(folder).net, Vocabulary(vocabulary.tokens, Tokenizer(level="char")))
    assert "A char-level recurrent language model" in model_card(chars, config["network"], config["origin"])
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes  # readable as the others are: the folder can be shared


def tool(name: str, run: Path, model: Path, *overrides: str) -> dict | list:
    """What the tool returns, less what names the model or times the pass."""
    result = {"evaluate": evaluate, "score": score, "generate": generate}[name](
        app_config(name, run, f"ckpt_path={model}", *overrides)
    )
    return (
        {k: v for k, v in result.items() if k not in ("ckpt_path", "wall_seconds")}
        if name == "evaluate"
        else result
    )


def test_evaluate_score_and_generate_give_the_checkpoints_numbers_from_the_folder(exported, tmp_path):
    file = tmp_path / "lines.txt"
    file.write_text("the cat sat on the mat\na zebra\n\nred red red\n")
    for name, overrides in {
        "evaluate": exported["data"],
        "score": [f"file={file}", "carry_state=true"],
        "generate": ["prompt=the cat", "num_words=20", "num_samples=3"],
    }.items():
        from_checkpoint = tool(name, tmp_path / f"{name}-ckpt", exported["ckpt"], *overrides)
        from_folder = tool(name, tmp_path / f"{name}-folder", exported["folder"], *overrides)
        assert from_folder == from_checkpoint, name
    assert tool("evaluate", tmp_path / "e", exported["folder"], *exported["data"])["ppl"] == pytest.approx(
        exported["metrics"]["test_ppl"], rel=1e-9
    )


NO_TRAINING_STACK = """
import sys
for name in ("lightning", "lightning_fabric", "pytorch_lightning", "hydra", "omegaconf"):
    sys.modules[name] = None  # importing any of them fails
from lm.api import LanguageModel
print(repr(LanguageModel.load(sys.argv[1]).score(sys.argv[2]).log_probs))
"""


def test_a_folder_loads_and_scores_without_lightning_or_hydra(exported):
    text = "the cat sat on the mat\nred dog"
    result = subprocess.run(
        [sys.executable, "-c", NO_TRAINING_STACK, str(exported["folder"]), text],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(LanguageModel.load(exported["ckpt"]).score(text).log_probs)


def test_the_api_streams_rescores_and_predicts_as_one_pass_would(exported):
    model = LanguageModel.load(exported["folder"])
    whole = model.score("the cat sat on the mat\nred dog")
    assert whole.tokens == "the cat sat on the mat <eos> red dog <eos>".split()
    ids = model.vocabulary.encode([EOS, *whole.tokens])
    assert whole.log_probs == score_stream(model.model.net, ids, torch.device("cpu")).log_probs.tolist()

    stream = model.stream()
    pieces = [stream.score(piece) for piece in ["the cat", " sat on the", " mat\nred", " dog\n"]]
    assert [token for piece in pieces for token in piece.tokens] == whole.tokens
    streamed = [p for piece in pieces for p in piece.log_probs]
    assert streamed == pytest.approx(whole.log_probs, abs=1e-5)  # other windows, other float32 sums
    stream.reset()
    assert stream.score("the cat").log_probs == model.score("the cat\n").log_probs[:2]

    context, hypotheses = "red red", ["the cat sat", "a dog", "on the mat"]
    rescored = model.rescore(hypotheses, context)
    for hypothesis, scored in zip(hypotheses, rescored, strict=True):
        alone = model.stream()
        alone.score(context)
        assert scored.log_probs == alone.score(hypothesis + "\n").log_probs
        assert scored.log_prob == pytest.approx(
            model.score(f"{context} {hypothesis}").log_prob - model.stream().score(context).log_prob, abs=1e-4
        )

    next_log_probs = model.next_log_probs("the cat")
    assert next_log_probs.logsumexp(0).item() == pytest.approx(0, abs=1e-9)
    sat = model.vocabulary.index["sat"]
    assert next_log_probs[sat].item() == pytest.approx(model.score("the cat sat").log_probs[2], abs=1e-5)
    top = model.next_words("the cat", k=3)
    assert [word for word, _ in top] == model.vocabulary.decode(next_log_probs.topk(3).indices)
    assert [p for _, p in top] == pytest.approx(next_log_probs.exp().topk(3).values.tolist())

    samples = model.generate("the cat", num_words=10, num_samples=2, seed=3)
    assert samples == model.generate("the cat", num_words=10, num_samples=2, seed=3)
    assert all(sample.startswith("the cat") for sample in samples)


def break_folder(folder: Path, damage: str) -> str:
    """Damage a copy of the model folder as `damage` says; the file the error must name."""
    config = json.loads((folder / "config.json").read_text())
    if damage == "weights missing":
        (folder / "model.safetensors").unlink()
        return "model.safetensors is missing"
    if damage == "weights of another shape":
        config["network"]["hidden_size"] = 32
        (folder / "config.json").write_text(json.dumps(config))
        return "model.safetensors does not hold the weights of the network config.json describes"
    if damage == "weights damaged":
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
        return "model.safetensors does not hold the weights of the network config.json describes"
    if damage == "vocabulary of another size":
        lines = (folder / "vocab.txt").read_text().splitlines()
        (folder / "vocab.txt").write_text("".join(f"{line}\n" for line in lines[:-1]))
        return f"vocab.txt holds {len(lines) - 1} tokens, but"
    if damage == "config missing":
        (folder / "config.json").unlink()
        return "config.json is missing"
    if damage == "config not JSON":
        (folder / "config.json").write_text("{")
        return "config.json is not JSON"
    if damage == "a class to import":  # nothing named in a folder is imported
        config["network"]["_target_"] = "os.system"
        (folder / "config.json").write_text(json.dumps(config))
        return "config.json: its network options are refused: model.net._target_='os.system'"
    raise AssertionError(damage)


DAMAGES = [
    "weights missing",
    "weights of another shape",
    "weights damaged",
    "vocabulary of another size",
    "config missing",
    "config not JSON",
    "a class to import",
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_folder_is_one_error_naming_its_file(exported, tmp_path, damage):
    folder = shutil.copytree(exported["folder"], tmp_path / "model")
    message = break_folder(folder, damage)
    with pytest.raises(UserError) as error:
        LanguageModel.load(folder)
    assert message in str(error.value)
    assert str(folder) in str(error.value)


def test_export_refuses_a_folder_with_files_and_overwrite_replaces_only_its_own(exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        UserError, match=r"holds files already: give an empty or new folder, or overwrite=true"
    ):
        run_export(tmp_path / "run1", exported["ckpt"], out)
    assert [path.name for path in out.iterdir()] == ["notes.txt"]

    shutil.copy(exported["folder"] / "model.onnx", out / "model.onnx")  # an earlier export's
    run_export(tmp_path / "run2", exported["ckpt"], out, "overwrite=true")
    names = {path.name for path in out.iterdir()}
    assert names == {"notes.txt", "config.json", "model.safetensors", "vocab.txt", "README.md"}
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.*"))  # no partial folder left


def test_onnx_runtime_scores_the_test_split_as_the_eager_model_does(exported):
    model = load_model(exported["folder"])
    ids, _ = text_ids((exported["text"] / "test.txt").read_text(), model.vocabulary)
    eager = score_stream(model.net, ids, torch.device("cpu")).log_probs
    fp32 = OnnxScorer(exported["folder"] / "model.onnx").log_probs(ids, window=35)
    assert (fp32 - eager).abs().max().item() < 1e-4
    assert fp32.sum().item() == pytest.approx(eager.sum().item(), rel=1e-5)
    int8 = OnnxScorer(exported["folder"] / "model.int8.onnx").log_probs(ids, window=35)
    assert int8.mean().exp().item() == pytest.approx(eager.mean().exp().item(), rel=0.01)  # ppl within 1%
    int8_ops = {node.op_type for node in onnx.load(exported["folder"] / "model.int8.onnx").graph.node}
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= int8_ops  # the LSTM and the softmax in int8


def test_the_onnx_graph_takes_any_batch_and_length_and_feeds_its_state_back(exported):
    model = load_model(exported["folder"])
    scorer = OnnxScorer(exported["folder"] / "model.onnx")
    assert set(scorer.feedback.values()) == set(scorer.shapes)
    ids = torch.randint(len(model.vocabulary), (3, 11))
    state = scorer.empty_state(3)
    outputs = []
    for x in (ids[:, :4], ids[:, 4:]):  # two calls, the state fed back
        results = dict(
            zip(scorer.outputs, scorer.session.run(None, {"ids": x.numpy(), **state}), strict=True)
        )
        state = {scorer.feedback[name]: value for name, value in results.items() if name in scorer.feedback}
        outputs.append(torch.from_numpy(results["log_probs"]))
    with torch.no_grad():
        logits, _ = model.net(ids)
    assert torch.cat(outputs, dim=1) == pytest.approx(logits.log_softmax(-1), abs=1e-5)


@pytest.mark.parametrize(
    "network, reason",
    [
        ("mogrifier", "with a dynamic time axis: its cell steps through time in a Python loop"),
        ("xlstm", "its empty state is not zeros"),  # the sLSTM's stabiliser starts at -inf
    ],
)
def test_a_network_onnx_cannot_take_is_refused_in_one_line(exported, network, reason):
    node = {
        "mogrifier": {"_target_": "lm.models.mogrifier.MogrifierOptions", "hidden_size": 8},
        "xlstm": {"_target_": "lm.models.xlstm.XLSTMOptions", "embedding_size": 8, "num_heads": 2},
    }[network]
    vocabulary = load_model(exported["folder"]).vocabulary
    model = TrainedModel(build_network(node, len(vocabulary)).eval(), vocabulary)
    with pytest.raises(UserError, match=rf"^model.net={network} cannot be exported to ONNX") as error:
        onnx_model(model, network)
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_a_missing_export_package_is_one_line_naming_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError, match=r'safetensors package: pip install -e "\.\[export\]"$'):
        LanguageModel.load(exported["folder"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r'\(onnxruntime is missing\): pip install -e "\.\[export\]"$'):
        OnnxScorer(exported["folder"] / "model.onnx")


def test_bench_onnx_times_eager_fp32_and_int8_on_the_same_tokens(exported, capsys):
    result = bench_onnx.main(
        [str(exported["folder"]), "--file", str(exported["text"] / "test.txt"), "--rounds", "1"]
    )
    rows = {row["path"]: row for row in result["paths"]}
    assert list(rows) == ["eager", "onnxruntime fp32", "onnxruntime int8"]
    assert rows["eager"]["speed_ratio"] == 1 and rows["eager"]["ppl_change"] == 0
    assert rows["onnxruntime fp32"]["max_abs_log_prob_diff"] < 1e-4
    assert rows["onnxruntime int8"]["file_mb"] < rows["onnxruntime fp32"]["file_mb"]
    assert "onnxruntime int8" in capsys.readouterr().out


def test_the_readmes_python_example_runs(exported, tmp_path, monkeypatch):
    readme = (PROJECT_ROOT / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "model").symlink_to(exported["folder"])
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
