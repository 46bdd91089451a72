import contextlib
import resource
import signal

import numpy as np
import pytest
import torch
from torch import nn

import utils
from models import DeSDStudent, DeSDTeacher, create_model


def test_cosine_schedule_warms_up_linearly_then_decays_to_final():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=10, niter_per_ep=5, warmup_epochs=2)
    assert len(s) == 50
    assert s[0] == 0.0
    assert np.allclose(np.diff(s[:10]), s[1] - s[0])
    assert s[10] == pytest.approx(1.0)
    assert 0.1 < s[-1] < 0.1 + 0.45 * (1 + np.cos(np.pi * 38 / 40))  # one step short of final, as in DINO
    assert np.all(np.diff(s[10:]) <= 1e-12)


def test_schedule_shorter_than_warmup_is_all_warmup():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=2, niter_per_ep=3, warmup_epochs=10)
    assert len(s) == 6 and s[-1] == pytest.approx(1.0)


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decayed, plain = utils.get_params_groups(model)
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0


def test_teacher_ema_pairs_parameters_by_name_not_by_order():
    student = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    teacher = nn.ModuleDict({"b": nn.Linear(2, 2), "a": nn.Linear(2, 2)})  # other registration order
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    utils.update_teacher(student, teacher, momentum=0.75)
    s = student.state_dict()
    for k, v in teacher.state_dict().items():
        assert torch.allclose(v, 0.75 * before[k] + 0.25 * s[k])


def test_ema_of_desd_teacher_moves_backbone_and_last_head_only():
    torch.manual_seed(0)
    student = DeSDStudent(create_model("res3d10"), out_dim=8)
    teacher = DeSDTeacher.from_student(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    utils.update_teacher(student, teacher, momentum=0.5)
    s = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        assert torch.allclose(p, s[name] - 0.5), name


def test_ema_refuses_a_teacher_parameter_the_student_lacks():
    with pytest.raises(KeyError, match="extra"):
        utils.update_teacher(nn.ModuleDict({"a": nn.Linear(2, 2)}), nn.ModuleDict({"a": nn.Linear(2, 2), "extra": nn.Linear(2, 2)}), 0.9)


def test_last_layer_gradients_are_dropped_only_while_frozen():
    student = DeSDStudent(create_model("res3d10"), out_dim=8, norm_last_layer=False)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    utils.cancel_gradients_last_layer(0, student, freeze_last_layer=1)
    assert all(p.grad is None for n, p in student.named_parameters() if "last_layer" in n)
    assert all(p.grad is not None for n, p in student.named_parameters() if "last_layer" not in n)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    utils.cancel_gradients_last_layer(1, student, freeze_last_layer=1)
    assert all(p.grad is not None for p in student.parameters())


def test_save_atomic_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = str(tmp_path / "ck.pth")
    utils.save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(OSError, match="ck.pth"):
        utils.save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(utils.load_checkpoint(path)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail (EFBIG) as they would on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_that_runs_out_of_space_names_the_file_and_keeps_the_old_one(tmp_path):
    path = str(tmp_path / "ck.pth")
    utils.save_atomic({"a": torch.ones(2)}, path)
    with (
        file_size_limit(2**20),
        pytest.raises(OSError, match=r"could not write .*ck\.pth.*MiB free there\. The file already there is unchanged"),
    ):
        utils.save_atomic({"a": torch.ones(2**20)}, path)
    assert torch.equal(utils.load_checkpoint(path)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]


def test_truncated_checkpoint_is_reported_with_its_path(tmp_path):
    path = tmp_path / "ck.pth"
    utils.save_atomic({"a": torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="ck.pth"):
        utils.load_checkpoint(str(path))


def test_the_checkpoint_writer_writes_the_state_as_it_was_handed_over_and_raises_a_failed_write(tmp_path):
    writer = utils.CheckpointWriter()
    weights = torch.zeros(2**20)
    state = {"student": {"w": weights}, "optimizer": {"state": {0: {"exp_avg": weights}}, "param_groups": [{"lr": 0.5}]}}
    writer.write(state, [(str(tmp_path / "checkpoint.pth"), True), (str(tmp_path / "checkpoint0000.pth"), False)])
    weights += 1  # the next training step, while the write may still be under way
    writer.wait()
    for name in ("checkpoint.pth", "checkpoint0000.pth"):
        saved = utils.load_checkpoint(str(tmp_path / name))
        assert saved["student"]["w"].sum() == 0 and saved["optimizer"]["state"][0]["exp_avg"].sum() == 0
        assert saved["optimizer"]["param_groups"] == [{"lr": 0.5}]
    writer.write({"epoch": 2}, [(str(tmp_path / "checkpoint.pth"), True)])
    writer.wait()
    assert utils.load_checkpoint(str(tmp_path / "checkpoint.prev.pth"))["student"]["w"].sum() == 0  # rotated as before

    with file_size_limit(2**20), pytest.raises(OSError, match=r"could not write .*checkpoint\.pth.*already there is unchanged"):
        writer.write({"w": weights}, [(str(tmp_path / "checkpoint.pth"), True)])  # 4 MiB on a disk with 1 MiB free
        writer.wait()  # the failure of the write on the thread, raised in the caller
    assert utils.load_checkpoint(str(tmp_path / "checkpoint.pth")) == {"epoch": 2}
    writer.wait()  # reported once


def test_device_augmentation_seeds_of_a_64_rank_300_epoch_1000_iteration_run_are_all_distinct():
    rank, epoch, it = np.meshgrid(np.arange(64), np.arange(300), np.arange(1000), indexing="ij")
    seeds = utils.hashed_seed(0, rank.ravel(), epoch.ravel(), it.ravel())
    ordered = np.sort(seeds)  # sorted, all distinct means no two neighbours equal (np.unique takes 20x as long here)
    assert seeds.dtype == np.uint64 and seeds.size == 64 * 300 * 1000 and np.all(ordered[1:] != ordered[:-1])
    # the scalar form is what training passes to torch, and equals the vectorised one
    assert utils.hashed_seed(0, 5, 7, 11) == int(seeds[(5 * 300 + 7) * 1000 + 11])
    assert utils.hashed_seed(1, 0, 0, 0) != utils.hashed_seed(0, 0, 0, 0)
    torch.Generator().manual_seed(utils.hashed_seed(0, 63, 299, 999))  # any 64-bit value is a valid torch seed


def test_curves_are_drawn_once_a_minute_at_most_and_always_after_the_last_epoch(tmp_path, monkeypatch):
    log, out = tmp_path / "log.txt", tmp_path / "curves.png"
    for epoch in range(3):
        utils.append_json_line(str(log), {"epoch": epoch, "train_loss": 1.0 / (epoch + 1)})
    clock = [100.0]
    monkeypatch.setattr(utils.time, "monotonic", lambda: clock[0])
    curves = utils.Curves(str(log), str(out), every=60.0)
    clock[0] = 130.0
    curves.update()
    assert not out.exists()  # half a minute after the start: not yet
    clock[0] = 161.0
    curves.update()
    assert out.stat().st_size > 10_000
    clock[0] = 170.0
    out.unlink()
    curves.update()
    assert not out.exists()  # 9 s after the last drawing
    curves.update(last_epoch=True)
    assert out.stat().st_size > 10_000


def test_a_resumed_run_drops_the_log_lines_of_the_epochs_it_redoes(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(f'{{"train_loss": 1.0, "epoch": {e}}}\n' for e in range(4)) + "not json\n")
    assert utils.drop_epochs_from(str(log), 2) == 2
    assert log.read_text() == '{"train_loss": 1.0, "epoch": 0}\n{"train_loss": 1.0, "epoch": 1}\nnot json\n'
    assert utils.drop_epochs_from(str(log), 2) == 0 and utils.drop_epochs_from(str(tmp_path / "none.txt"), 0) == 0
