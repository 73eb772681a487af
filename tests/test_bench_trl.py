"The TRL SFTTrainer row of `bench_train`: a tiny CPU run, counted honestly, whose loss falls."
import pytest
pytest.importorskip("trl")
from multilora.bench import TRL_LABEL, format_train_bench, random_model, trl_train_row
from multilora.data import builtin_tasks

def test_trl_row():
    tiny = random_model("tiny")
    # 4 examples pack into fewer than 4 rows of 256 tokens: every step trains on the same rows, so the loss must fall
    row = trl_train_row(tiny, builtin_tasks()[0], steps=6, batch_size=4, max_length=256, warmup=2, train_limit=4)
    assert row["steps"] == 6 and row["trl_version"] == "1.16.0"
    assert row["useful_tokens_per_s"] > row["loss_tokens_per_s"] > 0
    # the loss tokens counted on the host, batch by batch, are those the model trained on (summed on the device)
    assert row["loss_tokens_all_steps"] == row["loss_tokens_seen_by_model"] > 0
    assert row["loss_last"] < row["loss_first"]
    assert row["frozen_weights"] == "bnb" and row["gradient_checkpointing"] is False   # on a CPU, as multilora's rows
    res = {"config": {"model": "tiny", "layers": 2, "hidden_size": 128, "device": "cpu", "lengths": {}, "max_length": 256},
           "runs": {TRL_LABEL: {**row, "vs_baseline": 1.0}}}
    assert TRL_LABEL in format_train_bench(res)
