"""The experiment command end to end, in its smallest configuration."""

import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import pytest
import torch

import evaluate
from benchmarks import phantom_gate, pilot_recipes
from tests.helpers import REALCT, realct_files
from tools import real_ct_probe


@pytest.mark.slow
def test_smallest_experiment_runs_end_to_end_and_writes_results_table_and_figure(tmp_path):
    out = tmp_path / "ev"
    assert evaluate.main(["--config", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    cfg = evaluate.CONFIGS["smoke"]
    assert set(results["pretraining"]) == {f"{enc} seed{s}" for enc in ("desd", "dino") for s in cfg.seeds}
    for run in results["pretraining"].values():
        assert run["steps"] == cfg.epochs * cfg.iters_per_epoch and set(run["checks"]) >= {"kl_falls", "entropy_does_not_rise"}
    rows = results["probe"]["rows"]
    expected = {f"{enc} seed{s}" for enc in ("desd", "dino", "none", "desd student", "dino student") for s in cfg.seeds}
    assert set(rows) == expected | {"no network"}
    # the teacher on every feature set with both heads where asked; the student on its sets only
    assert set(rows["desd seed0"]["dense"]) == {"stage1", "stage2", "stage3", "stage4", "stages1-3"}
    assert set(rows["desd seed0"]["dense"]["stages1-3"]) == {"linear", "knn", "per_class"}
    assert set(rows["desd seed0"]["dense"]["stage1"]) == {"linear", "per_class"}
    assert set(rows["desd seed0"]["dense"]["stage1"]["linear"]) == {"4"}  # single stages at the largest count only
    assert set(rows["no network"]["dense"]) == {"histogram"}  # the strongest floor, both heads
    assert set(rows["no network"]["dense"]["histogram"]) == {"linear", "knn", "per_class"}
    assert set(rows["desd student seed0"]["dense"]) == set(cfg.student_sets)
    for count in ("1", "4"):
        dice = rows["none seed1"]["dense"]["stages1-3"]["linear"][count]
        assert len(dice) == cfg.probe_splits * (cfg.probe_draws if count == "1" else 1) and all(0 <= d <= 1 for d in dice)
    splits = results["probe"]["splits"]
    assert len(splits) == cfg.probe_splits and not set(splits[0]["held_out"]) & set(splits[1]["held_out"])
    assert {c["pair"] for c in results["claims"]} == {"desd - dino", "desd - none", "dino - none"} | {
        f"{enc} - histogram" for enc in ("desd", "dino", "none")
    }
    assert not any(c["holds"] for c in results["claims"])  # two seeds: no claim
    assert all(len(c["gaps"]) == len(cfg.seeds) for c in results["claims"])
    (curves,) = results["finetune"]["1"]["desd"]  # one pretraining seed fine-tuned in the smoke configuration
    assert set(curves) == {"1", "2"} and all(d is None or 0 <= d <= 1 for d in curves["2"])
    table = (out / "results.md").read_text()
    assert "| DeSD teacher, linear |" in table and "| histogram, 54 features (no network), k-NN |" in table and "holds" in table
    assert "Per held-out split" in table and "Per class" in table
    assert os.path.getsize(out / "evidence.png") > 10_000
    # the tables and the figure are redone from results.json alone
    (out / "results.md").unlink()
    assert evaluate.main(["--from_results", str(out / "results.json"), "--figure", str(out / "again.png")]) == 0
    assert (out / "results.md").read_text() == table and os.path.getsize(out / "again.png") > 10_000
    # a run finished by an earlier invocation has no time of this one's
    results = json.loads((out / "results.json").read_text())
    results["pretraining"]["desd seed0"]["seconds"] = None
    (out / "results.json").write_text(json.dumps(results))
    assert evaluate.main(["--from_results", str(out / "results.json"), "--figure", str(out / "again.png")]) == 0
    assert "| desd seed0 | 2 | - |" in (out / "results.md").read_text()
    # the same encoders on real CT, fitted on one scan and scored on two others (one seed: the test's minute)
    realct_files()
    results["settings"]["seeds"] = [0]
    (out / "results.json").write_text(json.dumps(results))
    assert real_ct_probe.main(["--results", str(out / "results.json"), "--realct", REALCT]) == 0
    results = evaluate.load_results(str(out / "results.json"))
    real = results["real_ct"]
    assert set(real["rows"]) == {"desd seed0", "dino seed0", "none seed0", "no network"}
    # the classes of both the abdomen and each test scan (the DICOM case has no kidney, the angiogram only its heart and aorta)
    assert real["scored"] == {"upperabdomen": ["liver", "spleen", "stomach", "aorta"], "chestcta": ["aorta"]}
    for row in real["rows"].values():
        for head in ("linear", "knn"):
            assert set(row[head]) == {"abdomen", *real_ct_probe.REAL_TESTS}  # the fitted scan scored too
            scores = [row[head][scan][real["classes"].index(c)] for scan in real_ct_probe.REAL_TESTS for c in real["scored"][scan]]
            assert all(0 <= d <= 1 for d in scores)
    assert real["fitted"] == ["liver", "spleen", "kidney", "stomach", "aorta"]  # the abdomen has no heart
    # the labels lie on their organs: a head on intensity histograms alone finds the liver it was fitted on
    assert real["rows"]["no network"]["linear"]["abdomen"][0] > 0.6
    assert real["median_hu"]["chestcta"]["aorta"] > 200  # the angiogram's contrast, read as HU
    table = (out / "results.md").read_text()
    assert "## Real CT (secondary)" in table and evaluate.real_ct_table(results) in table and "not manual ground truth" in table


@pytest.mark.parametrize("config", sorted(evaluate.CONFIGS))
@pytest.mark.parametrize("encoder", ["desd", "dino"])
def test_every_configuration_pretrains_with_arguments_main_desd_accepts(config, encoder, capsys):
    """The GPU configuration runs only where a device is lent: its flags are checked here, so
    that a misspelt or out-of-range one cannot waste that run."""
    import main_desd

    cfg = evaluate.CONFIGS[config]
    args = main_desd.get_args_parser().parse_args(evaluate.pretrain_command(cfg, encoder, "data/DeepLesion", "out", seed=2))
    main_desd.validate_args(args)
    assert (args.arch, args.batch_size_per_gpu, args.epochs, args.out_dim, args.seed) == (cfg.arch, cfg.batch, cfg.epochs, cfg.out_dim, 2)
    assert (args.clip_grad, args.momentum_teacher_end, args.global_crop_size) == (cfg.clip_grad, cfg.momentum_teacher_end, cfg.view)
    assert tuple(args.stage_weights) == tuple(float(w) for w in evaluate.STAGE_WEIGHTS[encoder])
    # the schedule falls from its scaled peak and leaves the warm-up: no warning before the run
    main_desd.warn_about_schedule(args, None, cfg.batch, 1)
    assert "WARNING" not in capsys.readouterr().out


def test_a_paired_gap_is_tested_over_seeds_and_never_from_fewer_than_three():
    from scipy import stats

    from evaluate import paired_gap

    gap = paired_gap([0.50, 0.52, 0.51], [0.40, 0.41, 0.42])  # gaps 0.10, 0.11, 0.09
    assert gap["mean"] == pytest.approx(0.10) and gap["std"] == pytest.approx(0.01)
    assert gap["p"] == pytest.approx(stats.ttest_1samp([0.10, 0.11, 0.09], 0).pvalue)
    assert math.isnan(paired_gap([0.5, 0.52], [0.4, 0.41])["p"])  # two seeds: no test
    assert paired_gap([0.5, float("nan"), 0.52, 0.51], [0.4, 0.4, 0.41, 0.42])["gaps"] == pytest.approx([0.1, 0.11, 0.09])


def test_holm_adjusts_step_down_and_leaves_untested_cells_out_of_the_family():
    from evaluate import holm

    adjusted = holm([0.01, 0.04, math.nan, 0.03, 0.005])
    # sorted: 0.005 x 4, 0.01 x 3, 0.03 x 2, 0.04 x 1, each at least the one before
    assert adjusted[4] == pytest.approx(0.02) and adjusted[0] == pytest.approx(0.03)
    assert adjusted[3] == pytest.approx(0.06) and adjusted[1] == pytest.approx(0.06) and math.isnan(adjusted[2])


def _rows(desd: list[float], dino: list[float], none: list[float], floor: float) -> dict:
    """A run's probe rows with one value per seed on stages 1-3 at 8 cases, linear head."""
    rows = {}
    for enc, values in (("desd", desd), ("dino", dino), ("none", none)):
        for seed, v in enumerate(values):
            rows[f"{enc} seed{seed}"] = {"dense": {"stages1-3": {"linear": {"8": [v]}}}}
    rows["no network"] = {"dense": {"histogram": {"linear": {"8": [floor]}}}}
    return rows


def test_the_primary_endpoint_is_tested_alone_and_the_rest_as_one_holm_family():
    from evaluate import claims

    # DeSD above DINO by 0.05 +- 0.01 over 3 seeds: p = 0.013 alone, and the primary holds
    rows = _rows([0.55, 0.56, 0.54], [0.50, 0.50, 0.50], [0.40, 0.47, 0.45], floor=0.70)
    out = {c["pair"]: c for c in claims(rows, (0, 1, 2), ["8"], ("stages1-3",))}
    assert set(out) == {"desd - dino", "desd - none", "dino - none", "desd - histogram", "dino - histogram", "none - histogram"}
    assert out["desd - dino"]["role"] == "primary" and out["desd - dino"]["holds"] and out["desd - dino"]["p"] > 0.01
    # the same size of gap in the family of five (Holm multiplies the smallest p by 5) does not
    assert out["desd - none"]["role"] == "secondary" and not out["desd - none"]["holds"]
    assert out["desd - none"]["p_holm"] >= min(1.0, 5 * min(c["p"] for c in out.values() if c["role"] == "secondary")) - 1e-12
    # below the floor by 0.2 in every seed: the gap's sign is kept, whatever holds
    assert out["desd - histogram"]["mean"] == pytest.approx(-0.15) and all(g < 0 for g in out["none - histogram"]["gaps"])
    # with two seeds nothing holds, the primary included
    two = claims(_rows([0.55, 0.56], [0.50, 0.50], [0.40, 0.47], floor=0.7), (0, 1), ["8"], ("stages1-3",))
    assert not any(c["holds"] for c in two)


def test_trend_checks_read_the_second_half_of_a_hand_made_log():
    def rec(h, kl, ret):
        return {"train_teacher_entropy": h, "train_kl": kl, "train_retrieval": ret, "train_loss": h + kl}

    falling = [rec(5.0, 3.0, 0.2), rec(4.0, 2.5, 0.3), rec(3.0, 2.0, 0.4), rec(3.0, 1.5, 0.5)]
    verdict = evaluate.trend_checks(falling, batch=8, out_dim=256)
    assert verdict["second_half"]["entropy"] == [3.0, 3.0] and verdict["second_half"]["kl"] == [2.0, 1.5]
    assert all(verdict["checks"].values())
    collapsing = [rec(2.0, 3.0, 0.5), rec(2.5, 2.5, 0.5), rec(3.0, 2.0, 0.5), rec(4.0, 1.0, 0.3)]
    checks = evaluate.trend_checks(collapsing, batch=8, out_dim=256)["checks"]
    assert checks == {"entropy_does_not_rise": False, "kl_falls": True, "retrieval_at_3x_chance": False}


def test_a_pilot_recipe_passes_only_on_trends_and_a_gain_above_two_seed_sd():
    def run(passes, dense, random):
        return {"passes": passes, "dense_dice": dense, "dense_dice_random": random}

    steady = [run(True, 0.30, 0.23), run(True, 0.32, 0.24)]  # gains 0.07 and 0.08: sd 0.007
    assert pilot_recipes.recipe_verdict(steady)["passes"]
    assert pilot_recipes.recipe_verdict(steady)["gain"] == pytest.approx(0.075)
    noisy = [run(True, 0.30, 0.23), run(True, 0.24, 0.24)]  # gains 0.07 and 0: mean 0.035, sd 0.049
    assert not pilot_recipes.recipe_verdict(noisy)["passes"] and pilot_recipes.recipe_verdict(noisy)["trends_pass"]
    collapsing = [run(True, 0.30, 0.23), run(False, 0.32, 0.24)]
    assert not pilot_recipes.recipe_verdict(collapsing)["passes"]
    one_seed = pilot_recipes.recipe_verdict([run(True, 0.40, 0.23)])
    assert not one_seed["passes"] and one_seed["gain_sd"] is None  # no verdict of gain from one seed
    failed = pilot_recipes.recipe_verdict([run(True, 0.30, 0.23), {"passes": False, "failed": "main_desd exited 1"}])
    assert not failed["passes"] and not failed["trends_pass"]


def fake_run(folder, epochs: int, seconds: float, exit_code: int = 0) -> list[str]:
    """A process that logs `epochs` lines to <folder>/log.txt, one every `seconds`, as main_desd does."""
    script = (
        "import os, sys, time\n"
        f"os.makedirs({str(folder)!r}, exist_ok=True)\n"
        f"for e in range({epochs}):\n"
        f"    time.sleep({seconds})\n"
        f"    open(os.path.join({str(folder)!r}, 'log.txt'), 'a').write('{{}}\\n')\n"
        f"sys.exit({exit_code})\n"
    )
    return [sys.executable, "-c", script]


def test_the_scheduler_runs_its_jobs_at_once_then_in_waves_and_keeps_a_failure(tmp_path):
    lengths = (2, 5, 2)  # the second runs longest, and fails at its end
    jobs = [
        evaluate.Job(f"job{i}", fake_run(tmp_path / f"j{i}", n, 0.4, exit_code=3 if i == 1 else 0), str(tmp_path / f"j{i}"), n)
        for i, n in enumerate(lengths)
    ]
    evaluate.run_concurrently(jobs, at_once=2, deadline=math.inf, hard_deadline=math.inf, poll=0.05)
    first, second, third = jobs
    assert abs(first.started - second.started) < 0.3  # the first wave together
    assert first.ended <= third.started < second.ended  # the third waits for a free place, and no longer
    assert [len(j.epoch_times) for j in jobs] == list(lengths) and all(j.epoch_times[1] > j.epoch_times[0] for j in jobs)
    assert first.error == third.error == "" and "job1 failed (exit 3)" in second.error


def test_a_projection_past_the_deadline_stops_every_job_and_names_the_shortfall(tmp_path):
    """Runs of 20 epochs of 0.3 s cannot end within 3 s: stopped once two epochs are timed, not shrunk."""
    jobs = [evaluate.Job(f"job{i}", fake_run(tmp_path / f"j{i}", 20, 0.3), str(tmp_path / f"j{i}"), 20) for i in range(3)]
    start = time.time()
    with pytest.raises(evaluate.Shortfall, match=r"3 runs of 20 epochs, 2 at once, would end \d+ s after"):
        evaluate.run_concurrently(jobs, at_once=2, deadline=start + 3, hard_deadline=math.inf, poll=0.05)
    assert time.time() - start < 2.5  # well before the deadline: at the third epoch at the latest
    assert all(j.proc.poll() is not None for j in jobs[:2]) and jobs[2].proc is None  # killed; the third never started
    assert all(len((tmp_path / f"j{i}" / "log.txt").read_text().split()) < 20 for i in range(2))


def test_the_projection_runs_each_job_at_its_pace_then_the_queue_in_waves():
    job = evaluate.Job("a", [], "", epochs=10, started=100.0, epoch_times=[12.0, 15.0, 18.0])  # 12 s start-up, 3 s an epoch
    assert job.projected_seconds() == 18.0 + 7 * 3.0
    slow = evaluate.Job("b", [], "", epochs=10, started=101.0, epoch_times=[10.0, 14.0])
    assert slow.projected_seconds() == 14.0 + 8 * 4.0
    # the running ones end at 100 + 39 and 101 + 46; 3 queued, 2 at once: two waves of the slowest's 46 s
    assert evaluate.projected_end([job, slow], queued=3, at_once=2, now=120.0) == 147.0 + 2 * 46.0
    assert evaluate.projected_end([job, evaluate.Job("c", [], "", 10, epoch_times=[5.0])], 0, 2, 120.0) is None


def test_a_schedule_the_patches_cannot_fill_is_refused_before_any_pretraining(tmp_path, monkeypatch):
    monkeypatch.setitem(evaluate.CONFIGS, "smoke", dataclasses.replace(evaluate.CONFIGS["smoke"], min_pretrain_steps=10**6))
    assert evaluate.main(["--config", "smoke", "--out", str(tmp_path / "ev")]) == 2
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "under the minimum of 1000000; nothing was pretrained" in results["refused"]
    assert not list((tmp_path / "ev").glob("pretrain_*")) and results["pretraining"] == {}


def test_fine_tuning_that_cannot_reach_its_steps_in_time_stops_after_its_first_scoring():
    cfg = evaluate.CONFIGS["smoke"]
    rng = np.random.default_rng(0)
    case = (rng.normal(size=(16, 64, 64)).astype(np.float32), (rng.random((16, 64, 64)) > 0.7).astype(np.int64))
    clock = evaluate.Clock(120.0)
    with pytest.raises(evaluate.Shortfall, match=r"fine-tuning for 100000 steps would end \d+ s after the time limit"):
        evaluate.fine_tune(cfg, [case], [case], 2, None, 0, torch.device("cpu"), [1, 100000], clock)
    assert clock.left() > 60  # stopped at once, not at the limit


def test_fine_tuning_hands_each_scoring_to_on_score_as_it_comes():
    """A long curve shows its first points before it ends (phantom_gate prints them)."""
    cfg = evaluate.CONFIGS["smoke"]
    rng = np.random.default_rng(0)
    case = (rng.normal(size=(16, 64, 64)).astype(np.float32), (rng.random((16, 64, 64)) > 0.7).astype(np.int64))
    seen = []
    curve = evaluate.fine_tune(
        cfg, [case], [case], 2, None, 0, torch.device("cpu"), [1, 2], evaluate.Clock(float("inf")), on_score=lambda *a: seen.append(a)
    )
    assert [step for step, _ in seen] == [1, 2] and dict(seen) == curve


@pytest.mark.slow
def test_the_gate_tool_scores_the_floor_and_a_network_on_the_labelled_set_it_is_given(tmp_path, capsys):
    """phantom_gate on the smoke configuration: the floor at each label count, the network's curve
    on the split asked for, the first-slice depth and each case's class voxels recorded."""
    out = tmp_path / "gate.json"
    argv = ["--config", "smoke", "--styles", "varied", "--msd_start", "0.45", "0.55", "--scratch_steps", "1", "2", "--split", "1",
            "--threads", "1", "--out", str(out)]  # fmt: skip
    assert phantom_gate.main(argv) == 0
    results = json.loads(out.read_text())
    cfg, one = evaluate.CONFIGS["smoke"], results["styles"]["varied"]
    assert results["msd_start"] == [0.45, 0.55] and one["classes"] == ["liver", "spleen", "kidney"]
    assert len(one["voxels"]) == cfg.labelled_cases and all(min(v) > 0 for v in one["voxels"])  # every organ in every case
    for head in ("linear", "knn"):
        assert sorted(one["floor"][head]["mean"], key=int) == [str(c) for c in cfg.probe_counts]
        assert all(0 <= v <= 1 for v in one["floor"][head]["mean"].values())
    curve = one["scratch"]
    assert curve["split"] == 1 and sorted(curve["dice"], key=int) == ["1", "2"] and len(curve["dice"]["2"]) == 3
    assert not set(curve["train_cases"]) & set(curve["held_out"])
    assert "from scratch, 2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        phantom_gate.main(["--config", "smoke", "--split", str(cfg.probe_splits)])


def test_the_gpu_run_enforces_its_own_clock(tmp_path, monkeypatch):
    """A step that outlives the clock is stopped and the run still writes what finished."""
    clock = evaluate.Clock(1.0)
    with pytest.raises(evaluate.OutOfTime):
        evaluate.run([sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path / "sleep.log"), clock.left())
    assert evaluate.CONFIGS["gpu"].time_limit <= 500  # a 9-minute call, less the wheels' install and start-up

    def too_slow(cfg, out, device, clock, results, lap):
        results["pretraining"]["desd seed0"] = {"steps": 1}
        raise evaluate.OutOfTime("pretraining stopped by the time limit")

    monkeypatch.setattr(evaluate, "experiment", too_slow)
    assert evaluate.main(["--config", "smoke", "--out", str(tmp_path / "ev"), "--time_limit", "5"]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "time limit" in results["stopped"] and results["pretraining"] == {"desd seed0": {"steps": 1}}


def test_split_means_slice_each_splits_draws_out_of_the_merged_list():
    from evaluate import split_means

    rows = _rows([0.5, 0.6, 0.7], [0.5, 0.5, 0.5], [0.4, 0.4, 0.4], floor=0.7)
    for seed in range(3):  # split 0 drew twice with 8 cases, split 1 once: 0.1 above split 0's
        v = rows[f"desd seed{seed}"]["dense"]["stages1-3"]["linear"]["8"][0]
        rows[f"desd seed{seed}"]["dense"]["stages1-3"]["linear"]["8"] = [v, v, v + 0.1]
    splits = [{"held_out": [0], "draws": {"8": [[1], [2]]}}, {"held_out": [1], "draws": {"8": [[0]]}}]
    results = {"probe": {"rows": rows, "splits": splits}, "settings": {"seeds": [0, 1, 2]}}
    assert split_means(results, "desd", "linear", "stages1-3", "8") == pytest.approx([0.6, 0.7])


def test_the_real_ct_probe_names_what_is_missing_before_any_work(tmp_path):
    run = tmp_path / "ev"
    run.mkdir()
    results = {"settings": dataclasses.asdict(evaluate.CONFIGS["smoke"])}
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="make realct"):
        real_ct_probe.main(["--results", str(run / "results.json"), "--realct", str(tmp_path / "nowhere")])
    realct_files()
    with pytest.raises(SystemExit, match=r"pretrain_desd_seed0/checkpoint.pth: no checkpoint"):
        real_ct_probe.main(["--results", str(run / "results.json"), "--realct", REALCT])
    assert (run / "results.json").read_text() == json.dumps(results)  # left as it was


def test_a_run_folder_keeps_one_phantom_style(tmp_path, monkeypatch):
    """--phantoms varied (every configuration's default) into a folder that holds a portal run is
    refused before anything is made; a folder of an older run (no phantoms.txt) counts as portal."""
    assert {cfg.phantoms for cfg in evaluate.CONFIGS.values()} == {"varied"}
    made = []
    monkeypatch.setattr("preprocessing.synthetic_deeplesion.make_deeplesion", lambda *a, **k: made.append(("unlabelled", k["style"])))
    monkeypatch.setattr("preprocessing.synthetic_deeplesion.make_msd", lambda *a, **k: made.append(("labelled", k["style"])))
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: None)  # the three preprocessing scripts
    (tmp_path / "DeepLesion").mkdir()
    cfg = evaluate.CONFIGS["smoke"]
    with pytest.raises(SystemExit, match="holds a run on portal phantoms, not varied"):
        evaluate.make_data(cfg, str(tmp_path))
    assert made == [] and not (tmp_path / "phantoms.txt").exists()
    (tmp_path / "DeepLesion").rmdir()
    evaluate.make_data(cfg, str(tmp_path))
    assert made == [("unlabelled", "varied"), ("labelled", "varied")] and (tmp_path / "phantoms.txt").read_text() == "varied\n"
    with pytest.raises(SystemExit, match="holds a run on varied phantoms, not portal"):
        evaluate.make_data(dataclasses.replace(cfg, phantoms="portal"), str(tmp_path))
    evaluate.make_data(cfg, str(tmp_path / "new" / "run"))  # a folder not made yet is made
    assert (tmp_path / "new" / "run" / "phantoms.txt").read_text() == "varied\n"


def test_fine_tuning_patches_are_flipped_only_along_the_axes_asked_for():
    """Left-right mirroring can be left out (ft_flip_axes), as for labels that tell left from right."""
    from downstream import cache

    rng = np.random.default_rng(0)
    image = np.broadcast_to(np.arange(32, dtype=np.float32), (8, 32, 32)).copy()  # rises along W
    label = (image > 15).astype(np.int64)
    case = (image, label, cache.foreground_locations(label, rng))

    def w_reversed(flip_axes) -> list[bool]:
        x, _ = evaluate.crop_batch([case], (4, 16, 32), 32, np.random.default_rng(1), flip_axes)
        return [bool(row[0, 0, 0] > row[0, 0, -1]) for row in x[:, 0].numpy()]

    assert not any(w_reversed((0, 1)))
    assert 0 < sum(w_reversed((0, 1, 2))) < 32
