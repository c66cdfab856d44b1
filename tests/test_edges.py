"""Bad input at the edges of ``fdjax run``: each is one line on stderr, exit status 2, and nothing
half-written in the output directory."""

from __future__ import annotations

import tomllib

import pytest
from PIL import Image

from fdjax.cli import main
from fdjax.config import Config, Fault, config_to_toml, load_config

from tests.test_cli import TINY_TOML


def test_reliability_settings_round_trip_through_toml():
    cfg = load_config(overrides=[
        "aggregation.rule=trimmed_mean", "aggregation.trim_fraction=0.2",
        "aggregation.max_delta_norm=50", "aggregation.round_timeout=2.5", "aggregation.quorum=2",
        "aggregation.clip_norm=3.5", "aggregation.num_byzantine=0", "aggregation.multi_krum_keep=2",
        "distill.staleness=hinge", "distill.staleness_a=2.0", "distill.staleness_b=1.5",
        "data.partition=dirichlet_client",
        "checkpoint.every_rounds=5", "checkpoint.every_seconds=none", "checkpoint.keep=3",
        'faults.clients=["crash:1@2+1.5", "hang:0@0", "nan:2@4"]'])
    assert Config.from_dict(tomllib.loads(config_to_toml(cfg))) == cfg
    assert cfg.faults.parsed == [Fault("crash", 1, 2, 1.5), Fault("hang", 0, 0, None),
                                 Fault("nan", 2, 4, None)]
    assert load_config().aggregation.round_timeout is None  # the paper's default: wait for all


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def image_folder(root, damaged: bool) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    if damaged:
        (root / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fdjax: error:") and message in err[0], err
    return err[0]


@pytest.mark.parametrize("settings, message", [
    (["aggregation.quorum=9"], "aggregation.quorum: must be <= clients.count (3), got 9"),
    (["aggregation.rule=bulyan"], "aggregation.rule: must be one of"),
    (["clients.learning_rate=inf"], "clients.learning_rate: must be a finite number, got inf"),
    (["aggregation.rule=krum", "aggregation.num_byzantine=1"], "more than 2f + 2"),
    (["aggregation.trim_fraction=0.5"], "aggregation.trim_fraction: must be in [0, 0.5)"),
    (["aggregation.round_timeout=0"], "aggregation.round_timeout: must be > 0"),
    (["aggregation.max_delta_norm=big"], "aggregation.max_delta_norm: expected float"),
    (["checkpoint.keep=1"], "checkpoint.keep: must be >= 2"),
    (["checkpoint.every_rounds=1.5"], "checkpoint.every_rounds: expected int"),
    (['faults.clients=["crash:7@1"]'], "faults.clients: client 7 does not exist"),
    (['faults.clients=["melt:1@1"]'], "unknown kind 'melt'"),
    (['faults.clients=["nan:1@1+2"]'], "only crash and hang take +SECONDS"),
    (["faults.clients=crash:1@1"], "faults.clients: expected list of str"),
    (["data.source=folder", "data.root=/nonexistent/images"], "does not exist"),
])
def test_bad_settings_and_missing_data_write_nothing(capsys, tmp_path, tiny_config, settings,
                                                     message):
    out = tmp_path / "out"
    argv = ["run", "--config", str(tiny_config), "--out", str(out)]
    one_line_error(capsys, argv + [x for s in settings for x in ("--set", s)], message)
    assert not out.exists()


def test_a_damaged_image_is_named_and_nothing_is_written(capsys, tmp_path, tiny_config):
    image_folder(tmp_path / "images", damaged=True)
    out = tmp_path / "out"
    line = one_line_error(capsys, ["run", "--config", str(tiny_config), "--out", str(out),
                                   "--set", "data.source=folder", "--set",
                                   f"data.root={tmp_path / 'images'}", "--set", "data.limit=none",
                                   "--set", "data.proxy_size=2"], "cannot read image")
    assert "1.png" in line and not out.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "cannot read"),                       # a directory, not a file
    (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "cannot read"),  # not UTF-8
    (lambda p: p.write_text("[clients]\ncount = 'three'\n"), "clients.count: expected int"),
])
def test_unreadable_or_invalid_config_files(capsys, tmp_path, make, message):
    path = tmp_path / "config.toml"
    make(path)
    one_line_error(capsys, ["run", "--config", str(path), "--out", str(tmp_path / "o")], message)
    assert not (tmp_path / "o").exists()


def test_an_output_path_that_is_a_file_is_refused(capsys, tmp_path, tiny_config):
    out = tmp_path / "taken"
    out.write_text("not a directory")
    one_line_error(capsys, ["run", "--config", str(tiny_config), "--out", str(out)],
                   "cannot write to output directory")
    assert out.read_text() == "not a directory"


def test_resume_errors(capsys, tmp_path, tiny_config):
    one_line_error(capsys, ["run", "--resume", str(tmp_path / "absent")], "not a run directory")
    one_line_error(capsys, ["run", "--resume", str(tmp_path), "--set", "seed=1"],
                   "drop --set")
    (tmp_path / "config.toml").write_text(TINY_TOML)
    one_line_error(capsys, ["run", "--resume", str(tmp_path)], "no checkpoint in")
    (tmp_path / "config.toml").write_text("[clients]\ncount = 0\n")
    one_line_error(capsys, ["run", "--resume", str(tmp_path)], "clients.count: must be >= 1")
