"""The run config: defaults, YAML round trip, overrides, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fullslide.cli import main
from fullslide.errors import ConfigError
from fullslide.train.config import Config, config_from_dict, dump_yaml, load_config


def test_defaults_round_trip_through_yaml_with_descriptions() -> None:
    text = dump_yaml(Config())
    assert "tiles_per_slide: 512  # K: tiles sampled per slide" in text
    assert config_from_dict(yaml.safe_load(text)) == Config()


def test_overrides_parse_yaml_values_and_nest(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\nencoder:\n  name: resnet18\n")
    cfg = load_config(path, ["train.tiles_per_slide=all", "data.fractions=[0.5, 0.25, 0.25]", "encoder.freeze=true",
                             "train.class_weights=[1, 2.5]", "encoder.kwargs={width: 8}"])
    assert cfg.train.epochs == 3 and cfg.train.tiles_per_slide == "all"
    assert cfg.data.fractions == [0.5, 0.25, 0.25] and cfg.encoder.freeze is True
    assert cfg.train.class_weights == [1.0, 2.5] and cfg.encoder.kwargs == {"width": 8}


@pytest.mark.parametrize("override,message", [
    ("train.epochz=3", "unknown config key 'train.epochz'"),
    ("trainer.epochs=3", "unknown config key 'trainer'"),
    ("train.epochs=three", "config key 'train.epochs': expected int"),
    ("train.mode=fast", "config key 'train.mode': 'fast' is not one of"),
    ("encoder.freeze=1", "config key 'encoder.freeze': expected bool"),
    ("train.epochs=0", "config key 'train.epochs' must be >= 1"),
    ("data.fractions=[0.5, 0.5, 0.5]", "config key 'data.fractions' must be three"),
    ("train.tiles_per_slide=some", "config key 'train.tiles_per_slide'"),
    ("epochs", "expected key=value"),
])
def test_bad_values_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    (tmp_path / "evil.yaml").write_text("run_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")


def test_config_show_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--show", "--set", "train.epochs=7"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 7  # number of epochs" in out
    assert load_config(None, ["train.epochs=7"]) == config_from_dict(yaml.safe_load(out))
    assert main(["config", "--set", "train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
