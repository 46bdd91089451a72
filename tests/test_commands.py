"""Every installed command behaves like the field's tools: its usage names it, `--help` shows each
flag with its help and default, `--version` answers, a bad flag is one `error:` line with exit
status 2, a known error one `error: ...` line with exit status 1, and Ctrl-C exits quietly
with 130."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import pytest

from preprocessing.runner import run_command, version
from tests.helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    SCRIPTS = tomllib.load(f)["project"]["scripts"]


def command(name: str):
    module, _, function = SCRIPTS[name].partition(":")
    return getattr(importlib.import_module(module), function)


class Captured(Exception):
    pass


def parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser the command builds, caught where it would parse."""

    def catch(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Captured) as caught:
        command(name)([])
    return caught.value.args[0]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_answers_help_version_and_a_bad_flag(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{name}"])
    with pytest.raises(SystemExit) as stop:
        command(name)(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"usage: {name} ")
    with pytest.raises(SystemExit) as stop:
        command(name)(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"{name} {version()}"
    with pytest.raises(SystemExit) as stop:
        command(name)(["--no_such_flag"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{name}: error:" in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_has_help_and_the_help_shows_its_default(name, monkeypatch):
    parser = parser_of(name, monkeypatch)
    bare = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions if not (a.help or "").strip()]
    assert not bare, f"{name}: flags without help: {bare}"
    assert isinstance(parser.formatter_class("x"), argparse.ArgumentDefaultsHelpFormatter)


def test_a_known_error_is_one_line_and_exit_status_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DESD_DEBUG", raising=False)
    assert command("desd-predict")(["--model", str(tmp_path / "none"), "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "none' does not exist: give a fine-tuning output folder" in err
    monkeypatch.setenv("DESD_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(FileNotFoundError):
        command("desd-predict")(["--model", str(tmp_path / "none"), "--input", str(tmp_path), "--output", str(tmp_path / "o")])


def test_ctrl_c_ends_quietly_with_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_command(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_refusal_raised_as_system_exit_reads_as_an_error_line(capsys):
    def refuse(argv):
        raise SystemExit("plans.json: not valid JSON")

    assert run_command(refuse) == 1
    assert capsys.readouterr().err == "error: plans.json: not valid JSON\n"


@pytest.mark.parametrize(
    "script, env, expected",
    [
        ("run_ssl.sh", {"DATA_PATH": "d", "OUTPUT_DIR": "o"}, ["--data_path {here}/d", "--output_dir {here}/o"]),
        (
            "run_finetune.sh",
            {"DATA_DIR": "d", "OUTPUT_DIR": "o", "PRETRAINED": "t.pth"},
            ["--data_dir {here}/d", "--pretrained {here}/t.pth"],
        ),
        ("run_finetune.sh", {"DATA_DIR": "/abs/d", "PRETRAINED": ""}, ["--data_dir /abs/d", "--pretrained  ", "finetune_res3d50_scratch"]),
        ("run_predict.sh", {"MODEL": "m", "INPUT": "i", "OUTPUT": "p"}, ["--model {here}/m --input {here}/i --output {here}/p"]),
    ],
)
def test_the_run_scripts_resolve_relative_paths_against_the_callers_folder(tmp_path, script, env, expected):
    """PYTHON is a stand-in that prints the command line it is given (and runs `-c` snippets)."""
    import subprocess

    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\necho "$@"\n')
    fake.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    out = subprocess.run(
        ["sh", os.path.join(ROOT, script)], cwd=caller, env={**os.environ, **env, "PYTHON": str(fake)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    for piece in expected:
        assert piece.format(here=caller) in out.stdout + " ", out.stdout
    assert not os.path.exists(os.path.join(ROOT, "o"))  # nothing created inside the checkout


def test_the_published_recipe_is_one_file_that_run_ssl_and_desd_pretrain_read(tmp_path, monkeypatch, capsys):
    parser = parser_of("desd-pretrain", monkeypatch)
    monkeypatch.undo()
    from preprocessing.runner import parse_with_config

    recipe = os.path.join(ROOT, "recipes", "desd_res3d50.json")
    args = parse_with_config(parser, ["--config", recipe])
    published = dict(optimizer="sgd", lr=0.3, min_lr=0.048, weight_decay=1e-6, clip_grad=0.0, use_bn_in_head=True, use_fp16=False)
    published.update(batch_size_per_gpu=32, epochs=300, out_dim=60000, teacher_temp=0.07, warmup_teacher_temp_epochs=20, arch="res3d50")
    assert {k: getattr(args, k) for k in published} == published
    assert parse_with_config(parser, ["--config", recipe, "--lr", "0.1"]).lr == 0.1  # the command line wins
    with open(os.path.join(ROOT, "run_ssl.sh")) as f:
        assert "--config recipes/desd_res3d50.json" in f.read()
    run = tmp_path / "args.json"  # a run's args.json: its non-flags are named and ignored
    run.write_text('{"lr": 0.2, "rank": 3, "world_size": 8}')
    assert parse_with_config(parser, ["--config", str(run)]).lr == 0.2
    assert "not flags of this command, ignored: rank, world_size" in capsys.readouterr().err
    run.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        parse_with_config(parser, ["--config", str(run)])
    assert "--config" in capsys.readouterr().err


def test_finetune_takes_its_required_data_dir_from_a_config(tmp_path, monkeypatch):
    parser = parser_of("desd-finetune", monkeypatch)
    monkeypatch.undo()
    from preprocessing.runner import parse_with_config

    (tmp_path / "args.json").write_text(json.dumps({"data_dir": "data/Task03_Liver", "epochs": 7}))
    args = parse_with_config(parser, ["--config", str(tmp_path / "args.json"), "--epochs", "9"])
    assert args.data_dir == "data/Task03_Liver" and args.epochs == 9


def test_a_worker_failure_under_torchrun_ends_in_one_error_line_with_its_status(tmp_path):
    """run_finetune.sh with a teacher that is not there: the worker's own `error:` line, then one
    line naming the script, its rank and exit status; no traceback, no ChildFailedError block."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "DESD_DEBUG"}
    env.update(
        PYTHON=sys.executable, DATA_DIR=str(tmp_path / "data"), PRETRAINED=str(tmp_path / "missing.pth"), OUTPUT_DIR=str(tmp_path / "out")
    )
    out = subprocess.run(["sh", os.path.join(ROOT, "run_finetune.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == "error: finetune.py failed on rank 0 with exit status 1 (its message is above)", out.stderr
    assert lines[-2].startswith("error:") and "missing.pth" in lines[-2], out.stderr
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr
