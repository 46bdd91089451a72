import json
import math
import os

import pytest
import torch

from models import DeSDStudent, DeSDTeacher, DINOHead, create_model, list_models

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "res3d50_state_dict_shapes.tsv")  # the released weights' names
ALL_DEPTHS = os.path.join(os.path.dirname(__file__), "data", "res3d_state_dict_shapes.json")  # the reference networks, every depth


@pytest.mark.parametrize("name", list_models())
def test_every_depth_gives_four_stage_maps_with_expected_shapes_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(1, 1, 18, 40, 56)  # uneven sides
    feats = model(x)
    assert len(feats) == 4
    for fmap, info in zip(feats, model.feature_info):
        rd, rh, rw = info["reduction"]
        assert fmap.shape == (1, info["num_chs"], math.ceil(18 / rd), math.ceil(40 / rh), math.ceil(56 / rw))
        assert torch.isfinite(fmap).all()
    sum(f.mean() for f in feats).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"


def test_res3d50_names_and_shapes_equal_the_released_weights():
    expected = {}
    with open(REFERENCE) as f:
        next(f)
        for line in f:
            key, shape = line.strip().split("\t")
            expected[key] = tuple(int(s) for s in shape.split("x"))
    actual = {k: tuple(v.shape) for k, v in create_model("res3d50").state_dict().items()}
    assert actual == expected
    assert len(actual) == 159


@pytest.mark.parametrize("name", list_models())
def test_every_depth_has_the_reference_names_and_shapes_including_the_layer1_shortcut(name):
    with open(ALL_DEPTHS) as f:
        expected = {k: tuple(v) for k, v in json.load(f)[name].items()}
    model = create_model(name)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == expected
    assert "layer1.0.downsample.0.weight" in actual and model.arch == name


@pytest.mark.parametrize("name,widths", [("res3d18", [64, 128, 256, 512]), ("res3d50", [256, 512, 1024, 2048])])
def test_stage_widths(name, widths):
    assert create_model(name).stage_channels == widths


def test_unknown_arch_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="res3d50"):
        create_model("resnet50")


def test_student_head_widths_follow_the_backbone_and_teacher_is_an_exact_copy():
    torch.manual_seed(0)
    student = DeSDStudent(create_model("res3d18"), out_dim=32, use_bn=True)
    assert [h.mlp[0].in_features for h in student.heads.values()] == [64, 128, 256, 512]
    teacher = DeSDTeacher.from_student(student)
    s_state = student.state_dict()
    t_state = teacher.state_dict()
    assert set(t_state) < set(s_state)
    assert all(torch.equal(t_state[k], s_state[k]) for k in t_state)
    assert list(teacher.heads) == ["layer4"]
    assert not any(p.requires_grad for p in teacher.parameters())


def test_student_and_teacher_outputs_shapes_with_local_views():
    torch.manual_seed(0)
    student = DeSDStudent(create_model("res3d10"), out_dim=16)
    teacher = DeSDTeacher.from_student(student)
    views = [torch.randn(2, 1, 16, 64, 64) for _ in range(2)] + [torch.randn(2, 1, 16, 48, 48) for _ in range(3)]
    outs = student(views)
    assert [tuple(o.shape) for o in outs] == [(10, 16)] * 4
    assert tuple(teacher(views[:2]).shape) == (4, 16)


def test_dino_head_prototypes_have_unit_norm_and_fixed_norm_when_asked():
    head = DINOHead(32, 100, use_bn=False, norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad
    norms = head.last_layer.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones(100), atol=1e-5)
    assert DINOHead(32, 100, norm_last_layer=False).last_layer.weight_g.requires_grad
    names = set(dict(head.named_parameters()))
    assert {"last_layer.weight_g", "last_layer.weight_v", "mlp.0.weight", "mlp.4.weight"} <= names
