"""The fdjax command: info, a quick training run, and one-line errors with exit status 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fdjax.cli import main


def test_info_through_the_installed_console_script():
    beside = Path(sys.executable).parent / "fdjax"
    exe = str(beside) if beside.exists() else shutil.which("fdjax")
    assert exe, "the fdjax console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120, check=True)
    assert "fdjax 0.1.0" in out.stdout and "backend" in out.stdout


def test_train_on_the_embedded_default_learns(capsys):
    assert main(["train", "--epochs", "2", "--width", "0.5"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch 2")]
    accuracy = float(lines[0].split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.8  # digits: chance is 0.1


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "cnn99"], "unknown model preset 'cnn99'"),
    (["train", "--source", "tfds", "--data-dir", "/nonexistent/tfds"], "does not exist"),
    (["train", "--optimizer", "lion"], "unknown optimizer"),
    (["train", "--epochs", "0"], "--epochs must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_status_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("fdjax: error:")
