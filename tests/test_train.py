import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from models import create_model
from tests.helpers import ROOT, TINY_TRAIN_ARGS, free_port, run_main_desd, write_patches


def tiny_run(root, out, *extra):
    run_main_desd(["--data_path", root, "--output_dir", str(out), *TINY_TRAIN_ARGS, *extra])


def test_checkpoint_layout_loads_in_safe_mode_and_log_has_one_line_per_epoch(patch_root, tmp_path, capsys):
    out = tmp_path / "out"
    tiny_run(patch_root, out, "--epochs", "2", "--saveckp_freq", "1", "--local_crops_number", "1")
    console = capsys.readouterr().out
    progress = [line for line in console.splitlines() if line.startswith("Epoch: [") and "total time" not in line]
    assert progress and all(len(line) <= 160 and "run eta" in line and "ret " in line for line in progress)
    assert len(console.splitlines()) < 40  # no argument dump: the arguments are in args.json
    assert json.loads((out / "args.json").read_text())["arch"] == "res3d10"
    assert (out / "curves.png").stat().st_size > 10_000
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "args", "desd_loss", "iteration"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 0
    assert "center" in ckpt["desd_loss"]
    assert all(k.startswith("module.") for k in ckpt["teacher"])
    assert "module.backbone.conv1.weight" in ckpt["teacher"] and "module.heads.layer4.last_layer.weight_v" in ckpt["teacher"]
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth", "log.txt"}
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert {"train_loss", "train_stage1", "train_stage4", "train_teacher_entropy", "train_retrieval", "train_lr"} <= set(lines[0])


def test_views_made_on_the_training_device_train_on_the_cpu_too(patch_root, tmp_path):
    out = tmp_path / "out"
    tiny_run(patch_root, out, "--epochs", "1", "--augment_on_device", "True", "--local_crops_number", "2", "--num_workers", "1")
    (line,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert math.isfinite(line["train_loss"]) and line["train_loss"] > 0


def test_keep_checkpoints_last_leaves_two_checkpoints_whatever_the_save_frequency(patch_root, tmp_path):
    out = tmp_path / "out"
    tiny_run(patch_root, out, "--epochs", "3", "--saveckp_freq", "1", "--keep_checkpoints", "last", "--max_iters_per_epoch", "1")
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint.prev.pth", "checkpoint.pth"]
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"] == 3


def test_fine_tuning_recipe_shares_all_159_encoder_tensors_of_a_res3d50_checkpoint(patch_root, tmp_path):
    out = tmp_path / "out"
    tiny_run(patch_root, out, "--arch", "res3d50", "--epochs", "1", "--max_iters_per_epoch", "1")
    # the recipe users are given (docs/method.md, section 7)
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["teacher"]
    state = {k.replace("module.backbone.", ""): v for k, v in state.items() if k.startswith("module.backbone.")}
    encoder = create_model("res3d50")
    model_dict = encoder.state_dict()
    shared = {k: v for k, v in state.items() if k in model_dict}
    model_dict.update(shared)
    encoder.load_state_dict(model_dict)
    assert len(shared) == 159
    assert torch.equal(encoder.conv1.weight, state["conv1.weight"])


def test_run_resumed_after_an_epoch_ends_with_the_same_state(tmp_path):
    root = write_patches(str(tmp_path / "data"), n=4)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ("--epochs", "2", "--saveckp_freq", "1")
    tiny_run(root, full, *args)
    resumed.mkdir()
    shutil.copy(full / "checkpoint0000.pth", resumed / "checkpoint.pth")  # state after epoch 0
    tiny_run(root, resumed, *args)
    assert [json.loads(line)["epoch"] for line in (resumed / "log.txt").read_text().splitlines()] == [1]
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint.pth", weights_only=True)
    for key in ("student", "teacher"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert torch.equal(a["desd_loss"]["center"], b["desd_loss"]["center"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--out_dim", "1"), "out_dim"),
        (("--global_crop_size", "0"), "global_crop_size"),
        (("--batch_size_per_gpu", "10"), "fewer than one batch"),
        (("--list_path", "missing.txt"), "missing.txt"),
        (("--lr", "nan"), "--lr must be a finite positive"),
        (("--lr", "0"), "--lr must be a finite positive"),
        (("--min_lr=-1e-6",), "--min_lr must be a finite non-negative"),
        (("--teacher_temp", "inf"), "--teacher_temp"),
        (("--warmup_teacher_temp", "0"), "--warmup_teacher_temp"),
        (("--momentum_teacher", "1.5"), "--momentum_teacher"),
        (("--weight_decay", "nan"), "--weight_decay"),
        (("--brightness_add_sd=-0.1",), "--brightness_add_sd must be a finite non-negative"),
        (("--stage_weights", "0", "0", "0", "0"), "not all zero"),
    ],
)
def test_bad_configuration_is_refused_before_any_work(patch_root, tmp_path, extra, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        tiny_run(patch_root, tmp_path / "out", *extra)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_unknown_arch_is_refused_by_the_command_line(patch_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, "main_desd.py", "--arch", "vit_small", "--data_path", patch_root], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "res3d50" in proc.stderr


@pytest.mark.slow
def test_two_process_gloo_run_through_torchrun(tmp_path):
    root = write_patches(str(tmp_path / "data"), n=8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "main_desd.py",
           "--data_path", root, "--output_dir", str(out), *TINY_TRAIN_ARGS, "--epochs", "1", "--max_iters_per_epoch", "2",
           "--use_bn_in_head", "True"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "process 1 of 2" in proc.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["world_size"] == 2
    assert all(k.startswith("module.backbone.") or k.startswith("module.heads.") for k in ckpt["teacher"])


def test_non_finite_loss_stops_and_leaves_the_last_checkpoint_intact(patch_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    tiny_run(patch_root, out, "--epochs", "1")
    before = (out / "checkpoint.pth").read_bytes()
    import loss

    original = loss.DeSDLoss.forward

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(loss.DeSDLoss, "forward", poisoned)
    with pytest.raises(SystemExit):
        tiny_run(patch_root, out, "--epochs", "2")
    assert "Loss is not finite at epoch 1" in capsys.readouterr().out
    assert (out / "checkpoint.pth").read_bytes() == before


def test_collapse_warnings(capsys):
    import math

    import main_desd

    main_desd.warn_if_collapsing({"loss": math.log(1000), "teacher_entropy": 3.0}, 1000)
    assert "near ln(out_dim)" in capsys.readouterr().out
    main_desd.warn_if_collapsing({"loss": 0.01, "teacher_entropy": 0.001}, 1000)
    assert "one-hot" in capsys.readouterr().out
    main_desd.warn_if_collapsing({"loss": 4.0, "teacher_entropy": 3.0}, 1000)
    assert capsys.readouterr().out == ""


def test_collapse_advice_skips_what_the_run_already_has(capsys):
    import argparse
    import math

    import main_desd

    has = argparse.Namespace(teacher_temp=0.04, use_bn_in_head=True, optimizer="sgd", clip_grad=3.0)
    main_desd.warn_if_collapsing({"loss": math.log(1000), "teacher_entropy": 3.0}, 1000, has)
    out = capsys.readouterr().out
    assert "--use_bn_in_head" not in out and "--teacher_temp 0.04" not in out and "a larger batch" in out
    main_desd.warn_if_collapsing({"loss": math.log(1000), "teacher_entropy": 3.0}, 1000, argparse.Namespace(teacher_temp=0.07))
    assert "--use_bn_in_head True" in capsys.readouterr().out
    warning = main_desd.slow_collapse_warning([1, 1, 2, 2], [2, 2, 1, 1], 10, args=has)
    assert "--optimizer sgd" not in warning and "--clip_grad 3" not in warning and "a lower learning rate" in warning


def test_only_rank_0_prints_and_other_ranks_keep_their_warnings(capsys):
    import builtins

    import utils

    original = builtins.print
    try:
        utils.setup_for_distributed(False, 3)
        print("progress line")
        print("WARNING: something on this rank")
        print("setup", force=True)
    finally:
        builtins.print = original
    assert capsys.readouterr().out.splitlines() == ["[rank 3] WARNING: something on this rank", "[rank 3] setup"]


def test_plot_log_draws_several_runs_over_each_other(tmp_path):
    from utils import panels_for, plot_logs

    for name, shift in (("desd", 0.0), ("dino", 0.5)):
        (tmp_path / name).mkdir()
        lines = [{"epoch": e, "train_loss": 8 - e + shift, "train_stage1": 8.0, "train_stage2": 8.0, "train_stage3": 8.0,
                  "train_stage4": 8.0, "train_teacher_entropy": 7.0, "train_retrieval": 0.1 * e, "train_lr": 1e-3,
                  "train_teacher_temp": 0.04} for e in range(4)]  # fmt: skip
        (tmp_path / name / "log.txt").write_text("\n".join(json.dumps(r) for r in lines) + "\n{cut short")
    out = plot_logs([str(tmp_path / "desd" / "log.txt"), str(tmp_path / "dino" / "log.txt")], str(tmp_path / "both.png"))
    assert os.path.getsize(out) > 10_000
    assert [t for t, _ in panels_for(lines)][:4] == ["loss", "per-stage loss", "teacher entropy", "view retrieval (top-1)"]
    assert [t for t, _ in panels_for([{"epoch": 0, "train_loss": 1.0, "lr": 1e-3, "dice_liver": 0.5}])] == ["loss", "learning rate", "Dice"]


def test_schedule_warnings_name_an_unscaled_min_lr_a_tiny_peak_and_a_warm_up_longer_than_the_run(capsys):
    import argparse

    import main_desd

    args = argparse.Namespace(lr=0.3, min_lr=0.048, warmup_epochs=10, epochs=7)
    main_desd.warn_about_schedule(args, None, 8, 10)  # peak 0.3 x 8 / 256 = 0.0094
    out = capsys.readouterr().out
    assert "below --min_lr 0.048" in out and "rises instead of falling" in out and "longer than the run" in out
    main_desd.warn_about_schedule(argparse.Namespace(lr=5e-4, min_lr=1e-6, warmup_epochs=1, epochs=7), None, 2, 10)
    assert "too small to learn" in capsys.readouterr().out
    main_desd.warn_about_schedule(argparse.Namespace(lr=0.3, min_lr=0.048, warmup_epochs=10, epochs=300), None, 192, 10)
    assert "WARNING" not in capsys.readouterr().out  # the published setting
    main_desd.warn_about_schedule(argparse.Namespace(lr=1e30, min_lr=0.048, warmup_epochs=10, epochs=300), None, 192, 10)
    assert "check --lr" in capsys.readouterr().out
    main_desd.warn_about_schedule(argparse.Namespace(lr=1.0, min_lr=1e-6, warmup_epochs=1, epochs=7, optimizer="adamw"), None, 256, 10)
    assert "far beyond what adamw trains with" in capsys.readouterr().out


def test_kl_is_logged_per_stage_as_the_loss_minus_the_teacher_entropy(patch_root, tmp_path, capsys):
    """Each logged line of a tiny run holds kl and kl_stage1..4, and each equals the stage's
    cross-entropy minus the teacher entropy (the weighted mean of them for `kl`)."""
    out = tmp_path / "out"
    tiny_run(patch_root, out, "--epochs", "2", "--stage_weights", "0.1", "0.2", "0.3", "0.4")
    assert "KL " in capsys.readouterr().out  # on the progress line
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    for rec in lines:
        kls = [rec[f"train_kl_stage{s}"] for s in range(1, 5)]
        for s, kl in zip(range(1, 5), kls):
            assert abs(kl - (rec[f"train_stage{s}"] - rec["train_teacher_entropy"])) < 1e-6
        assert abs(rec["train_kl"] - sum(w * k for w, k in zip((0.1, 0.2, 0.3, 0.4), kls))) < 1e-6


def test_slow_collapse_warning_fires_on_rising_entropy_with_falling_kl_and_not_otherwise():
    from main_desd import CollapseTrend, slow_collapse_warning

    n = 10
    rising = [2.9 + 0.2 * i for i in range(n)]  # toward ln(256) = 5.55
    falling = [2.7 - 0.2 * i for i in range(n)]
    warning = slow_collapse_warning(rising, falling, 256)
    assert warning is not None and "slow collapse" in warning and "--teacher_temp" in warning
    assert slow_collapse_warning(rising, [2.7] * n, 256) is None  # the KL does not fall: not this failure
    assert slow_collapse_warning([3.0] * n, falling, 256) is None  # a learning run: KL falls at flat entropy
    assert slow_collapse_warning(falling, falling, 256) is None  # entropy falling
    assert slow_collapse_warning(rising[:3], falling[:3], 256) is None  # too few points to call a trend
    trend = CollapseTrend(out_dim=256, window=6)
    for e, k in zip([3.0] * 20 + rising, [2.7] * 20 + falling):
        trend.add(e, k)
    assert len(trend.entropy) == 6 and trend.warning() is not None  # the window sees only the recent rise


def test_teacher_init_share_is_what_an_ema_of_a_zero_student_leaves_of_the_initial_teacher(capsys):
    import numpy as np

    import utils
    from main_desd import report_teacher_init_share, teacher_init_share

    schedule = utils.cosine_scheduler(0.99, 1.0, 8, 37)
    teacher = torch.ones(3)
    for m in schedule:  # update_teacher's EMA with a student held at zero
        teacher = m * teacher + (1 - m) * torch.zeros(3)
    assert abs(teacher_init_share(schedule) - teacher[0].item()) < 1e-6
    assert 0.2 < teacher_init_share(schedule) < 0.25  # 22.5% for evaluate's former 296-step schedule
    report_teacher_init_share(schedule)
    out = capsys.readouterr().out
    assert "22." in out and "WARNING" in out and "--momentum_teacher_end" in out
    report_teacher_init_share(utils.cosine_scheduler(0.98, 0.98, 8, 37))
    assert "WARNING" not in capsys.readouterr().out
    assert np.isclose(teacher_init_share(np.full(296, 0.98)), 0.98**296)
