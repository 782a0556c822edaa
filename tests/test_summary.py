"""The model summary at the start of training shows the project's count of FLOPs, per training token,
where Lightning's shows 0 for any LSTM network."""

import math
import re

from lightning.pytorch.utilities.model_summary import summarize

from lm.models.mogrifier import MogrifierOptions
from lm.models.xlstm import XLSTMOptions
from lm.training.summary import flops_per_token, summary_table
from tests.conftest import TINY_RUN, language_model, run_train

FLOPS_LINE = "Training FLOPs per token (matrix multiplies, forward and backward)"


def test_a_run_shows_the_training_flops_per_token_and_the_switch_turns_the_summary_off(tiny_corpus, tmp_path):
    run = [option for option in TINY_RUN if not option.startswith("trainer.enable_model_summary")]
    run += ["trainer.max_epochs=1", f"data.dir={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    shown = run_train(*run, f"hydra.run.dir={tmp_path / 'shown'}")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    # The tiny corpus has 12 words; hidden 16, 2 layers. Each layer: [x, h] = 32 into 4 x 16 = 64
    # gates, 2 x 32 x 64 = 4,096; the decoder 2 x 16 x 12 = 384; forward 8,576, and x3 = 25,728.
    assert f"25.7 K    {FLOPS_LINE}" in shown.stdout
    assert f"25.7 K    {FLOPS_LINE}" in (tmp_path / "shown" / "train.log").read_text()  # the run's log too
    assert re.search(r"\| net +\| LSTMNetwork +\| 4\.7 K +\| train", shown.stdout)  # and Lightning's figures
    assert "Total FLOPs" not in shown.stdout + shown.stderr  # Lightning's own summary, with its 0
    assert "already configured with model summary" not in shown.stdout + shown.stderr  # nor its note

    hidden = run_train(*run, "trainer.enable_model_summary=false", f"hydra.run.dir={tmp_path / 'hidden'}")
    assert hidden.returncode == 0, hidden.stdout + hidden.stderr
    assert "Trainable params" not in hidden.stdout + hidden.stderr


def test_the_adaptive_softmax_and_the_xlstm_have_no_figure_rather_than_a_wrong_one():
    model = language_model(vocab_size=100, hidden_size=16, softmax="adaptive", cutoffs=[20])
    table = summary_table(summarize(model), flops_per_token(model.net))
    note = "counted for the LSTM and Mogrifier with the full softmax"
    assert f"n/a       Training FLOPs per token ({note})" in table
    xlstm = XLSTMOptions(embedding_size=16, num_heads=2).network(12)
    assert math.isnan(flops_per_token(xlstm))


def test_a_mogrifier_network_counts_its_rounds_maps_too():
    # The network of the run above with 2 rounds: each layer's Q and R (16 x 16) add 2 x 256 to the
    # 4,288 multiply-adds per token (8,576 / 2), so (4,288 + 1,024) x 2 x 3 = 31,872.
    assert flops_per_token(MogrifierOptions(hidden_size=16, rounds=2).network(12)) == 31_872
    # Low-rank, each map is (16 x 4)(4 x 16), 128: (4,288 + 512) x 2 x 3 = 28,800.
    assert flops_per_token(MogrifierOptions(hidden_size=16, rounds=2, rank=4).network(12)) == 28_800
