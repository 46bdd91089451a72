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


@pytest.mark.parametrize("config", sorted(evaluate.CONFIGS))
@pytest.mark.parametrize("encoder", ["desd", "dino"])
def test_every_configuration_pretrains_with_arguments_main_desd_accepts(config, encoder, capsys):
    """The GPU configuration runs only where a device is lent: its flags are checked here, so
    that a misspelt or out-of-range one cannot waste that run."""
    import main_desd

    cfg = evaluate.CONFIGS[config]
    args = main_desd.get_args_parser().parse_args(evaluate.pretrain_command(cfg, encoder, "data/DeepLesion", "out"))
    main_desd.validate_args(args)
    assert (args.arch, args.batch_size_per_gpu, args.epochs, args.out_dim) == (cfg.arch, cfg.batch, cfg.epochs, cfg.out_dim)
    assert tuple(args.stage_weights) == tuple(float(w) for w in evaluate.STAGE_WEIGHTS[encoder])
    # the schedule falls from its scaled peak and leaves the warm-up: no warning before the run
    main_desd.warn_about_schedule(args, None, cfg.batch, 1)
    assert "WARNING" not in capsys.readouterr().out


def test_a_gap_is_claimed_only_when_it_exceeds_twice_its_spread_with_one_sign_for_every_seed():
    from evaluate import paired_gap

    held = paired_gap([0.50, 0.52, 0.51], [0.40, 0.41, 0.42])  # gaps 0.10, 0.11, 0.09
    assert held["holds"] and abs(held["mean"] - 0.10) < 1e-9 and abs(held["std"] - 0.01) < 1e-9
    assert not paired_gap([0.50, 0.52, 0.40], [0.40, 0.41, 0.42])["holds"]  # one seed the other way
    assert not paired_gap([0.50, 0.60, 0.41], [0.40, 0.41, 0.40])["holds"]  # same sign, but mean 0.10 < 2 x std (0.09)
    assert paired_gap([0.3, 0.31, 0.32], [0.5, 0.5, 0.5])["holds"]  # a loss is claimed too, with its sign
    assert not paired_gap([0.5], [0.4])["holds"]  # one seed: no spread, no claim
    assert paired_gap([0.5, float("nan"), 0.52, 0.51], [0.4, 0.4, 0.41, 0.42])["gaps"] == pytest.approx([0.1, 0.11, 0.09])
