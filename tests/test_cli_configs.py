"""Every YAML in configs/ parses and instantiates through the ``xlpeft`` CLI (LightningCLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_tiny import save_tiny_backbone
from xlpeft.data.labelled import LabelledDataModule
from xlpeft.lightning import AdapterModule
from xlpeft.lightning.cli import cli, main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("cli") / "tiny-bert"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_prints(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(args=["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(path.read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    assert printed["data"]["class_path"] == source["data"]["class_path"]
    for key, value in source["model"]["init_args"].items():
        assert printed["model"]["init_args"][key] == value, key


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates_on_a_tiny_backbone(path, backbone, tmp_path):
    overrides = [f"--model.init_args.backbone={backbone}", f"--data.init_args.backbone={backbone}",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    if "language_adapters" in yaml.safe_load(path.read_text())["model"]["init_args"]:
        overrides.append("--model.init_args.language_adapters=null")  # trained by another config
    run = cli(args=["--config", str(path), *overrides], run=False)
    assert isinstance(run.model, AdapterModule)
    assert run.trainer.max_steps == yaml.safe_load(path.read_text())["trainer"]["max_steps"]


def test_labelled_data_module_in_a_config(backbone, tmp_path, capsys):
    config = {
        "trainer": {"max_steps": 1, "logger": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "xlpeft.lightning.TaskAdaptation",
                  "init_args": {"backbone": backbone, "labels": ["neg", "pos"], "source_language": "eng"}},
        "data": {"class_path": "xlpeft.data.labelled.LabelledDataModule",
                 "init_args": {"backbone": backbone, "train": "train.tsv", "test": {"swh": "swh.tsv"}}},
    }
    path = tmp_path / "labelled.yaml"
    path.write_text(yaml.safe_dump(config))
    run = cli(args=["--config", str(path)], run=False)
    assert isinstance(run.datamodule, LabelledDataModule) and run.datamodule.hparams.test == {"swh": "swh.tsv"}


@pytest.mark.parametrize("where, key", [("model", "bogus_key"), ("top", "trainr")])
def test_an_unknown_key_fails_naming_it(where, key, tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs" / "mlm-language-adapters.yaml").read_text())
    if where == "model":
        config["model"]["init_args"][key] = 3
    else:
        config[key] = config.pop("trainer")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        cli(args=["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"'{key}" in err and "is not accepted" in err, err[-800:]


def test_demo_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xlpeft demo") and "--adapter-steps" in out



def test_genre_config_labels_follow_the_data_module_order():
    from xlpeft.data.genre import GENRES

    config = yaml.safe_load((ROOT / "configs" / "genre-task-adapter.yaml").read_text())
    assert config["model"]["init_args"]["labels"] == list(GENRES), "label ids would not match the data"
