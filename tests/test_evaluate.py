"""The experiment command end to end, in its smallest configuration."""

import json
import os

import pytest

import evaluate


@pytest.mark.slow
def test_smallest_experiment_runs_end_to_end_and_writes_results_table_and_figure(tmp_path):
    out = tmp_path / "ev"
    assert evaluate.main(["--config", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["probe"]) == {"desd", "dino", "none"} and all(len(v) == 4 for v in results["probe"].values())
    assert results["label_counts"] == [1, 3]
    for enc in ("desd", "dino", "none"):
        for count in ("1", "3"):
            (dice,) = results["finetune"][enc][count]  # one seed in the smoke configuration
            assert len(dice) == 3 and all(d is None or 0 <= d <= 1 for d in dice)
    assert all("train_retrieval" in line for line in results["pretraining_log"]["desd"])
    table = (out / "results.md").read_text()
    assert "| 1 |" in table and "desd" in table
    assert os.path.getsize(out / "evidence.png") > 10_000
