"""Benchmarks by name, offline: fixtures in the Hub datasets' own schema (features as their cards state them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict, Features

from lightning_tiny import save_tiny_backbone
from tiny import tiny_tokenizer
from xlpeft.data._common import MissingFileError
from xlpeft.data.benchmarks import BENCHMARKS, NER, BenchmarkDataModule, FloresDataModule, get_benchmark, load_split
from xlpeft.errors import CorruptFileError, XlpeftKeyError, XlpeftValueError
from xlpeft.lightning.cli import cli

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_local(data_dir: Path, name: str, rename: dict | None = None) -> None:
    """``data_dir/<name>/<config>/`` as ``DatasetDict.save_to_disk`` writes it, from the JSON fixture."""
    spec = json.loads((FIXTURES / f"{name}.json").read_text())
    features = spec["features"]
    if rename:
        features = json.loads(json.dumps(features).replace(*rename["from_to"]))
    for config, splits in spec["configs"].items():
        DatasetDict({s: Dataset.from_list(rows, features=Features.from_dict(features)) for s, rows in splits.items()}
                    ).save_to_disk(str(data_dir / name / config))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    for name in BENCHMARKS:
        write_local(root, name)
    return root


def module(data_dir: Path, **kw) -> BenchmarkDataModule:
    dm = BenchmarkDataModule(data_dir=str(data_dir), batch_size=2, **kw)
    dm.tokenizer = tiny_tokenizer()
    return dm


def test_fixture_schemas_are_the_hubs(data_dir: Path) -> None:
    for name, bench in BENCHMARKS.items():
        spec = json.loads((FIXTURES / f"{name}.json").read_text())
        assert spec["hub"] == bench.hub
        for config, splits in spec["configs"].items():
            assert set(splits) <= set(bench.splits.values())


def test_wikiann_zero_shot_splits(data_dir: Path) -> None:
    dm = module(data_dir, benchmark="wikiann", lang="sw", source_lang="en")
    assert dm.labels == list(NER)
    train, test = dm.examples("train"), dm.examples("test")
    assert [e.lang for e in train] == ["en"] * 4 and [e.lang for e in test] == ["sw"] * 3
    assert test[0].text == ("Juma", "anaishi", "Nairobi", ".") and test[0].label == ("B-PER", "O", "B-LOC", "O")
    assert train[1].label == ("O", "B-ORG", "I-ORG", "O", "O")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape and set(batch["langs"]) == {"en"}
    row = dm.datasets["train"][0]
    tagged = [t for t in row["label"] if t != -100]
    assert len(tagged) == len(train[0].text)  # one tag per word, on its first piece
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 3


def test_masakhaner_udpos_and_codes(data_dir: Path) -> None:
    dm = module(data_dir, benchmark="masakhaner", lang="swa", source_lang="swa")
    assert dm.labels[-2:] == ["B-DATE", "I-DATE"]
    assert dm.examples("train")[0].label == ("O", "B-PER", "O", "B-LOC", "B-DATE")
    ud = module(data_dir, benchmark="udpos", lang="yo_ytb", lang_code="yo", source_lang="en_ewt", source_code="en")
    assert ud.examples("test")[0].label == ("PROPN", "VERB", "NOUN", "PUNCT")
    assert {e.lang for e in ud.examples("test")} == {"yo"} and {e.lang for e in ud.examples("train")} == {"en"}
    ud.setup("test")
    assert len(ud.datasets["test"]) == 2


def test_xnli_pairs_and_americasnli_trains_on_xnli(data_dir: Path) -> None:
    dm = module(data_dir, benchmark="americasnli", lang="quy", source_lang="en")
    train, test = dm.examples("train"), dm.examples("test")
    assert train[0].text == ("A man is playing a guitar.", "A man plays music.")  # XNLI English
    assert [e.label for e in test] == ["entailment", "contradiction", "neutral"] and test[0].lang == "quy"
    dm.setup("fit")
    tok = dm.tokenizer
    row = dm.datasets["train"][1]
    assert row["label"] == 2  # contradiction
    assert row["input_ids"] == tok("A woman is reading.", "The woman is asleep.")["input_ids"]  # a pair
    assert row["input_ids"].count(tok.sep_token_id) == 2


def test_flores_pairs(data_dir: Path) -> None:
    dm = FloresDataModule(directions=["eng-swh"], flores_codes={"eng": "eng_Latn", "swh": "swh_Latn"},
                          data_dir=str(data_dir))
    val, test = dm.pairs("validation"), dm.pairs("test")
    assert [(p.src, p.tgt) for p in test] == [("The market opens at nine.", "Soko hufunguliwa saa tatu.")]
    assert len(val) == 2 and val[0].src_lang == "eng" and val[0].tgt_lang == "swh"
    with pytest.raises(XlpeftValueError, match="flores_codes"):
        FloresDataModule(directions=["eng-quy"], flores_codes={"eng": "eng_Latn"}, data_dir=str(data_dir))


def test_clear_errors(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(XlpeftKeyError, match="unknown benchmark 'conll'; known: americasnli"):
        get_benchmark("conll")
    with pytest.raises(MissingFileError, match="save_benchmark"):
        module(tmp_path, benchmark="wikiann").examples("test")
    with pytest.raises(XlpeftValueError, match="FloresDataModule"):
        BenchmarkDataModule(benchmark="flores")
    with pytest.raises(XlpeftValueError, match="splits validation, test"):
        load_split(BENCHMARKS["americasnli"], "quy", "train", data_dir)
    write_local(tmp_path, "wikiann", rename={"from_to": ("B-LOC", "B-GPE")})
    with pytest.raises(CorruptFileError, match="label names"):
        module(tmp_path, benchmark="wikiann").examples("train")


def test_hub_path_without_network_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'unimelb-nlp/wikiann' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(XlpeftValueError, match="Go online once, or pass `data_dir`"):
        load_split(BENCHMARKS["wikiann"], "sw", "test")


def test_wikiann_madx_config_runs_by_name(data_dir: Path, tmp_path: Path) -> None:
    """``xlpeft fit --config configs/wikiann-madx.yaml --data.lang sw`` on a machine that has the data."""
    backbone = str(save_tiny_backbone(tmp_path / "tiny-bert"))
    run = cli(args=["fit", "--config", str(CONFIGS / "wikiann-madx.yaml"), "--data.lang", "sw",
                    f"--data.data_dir={data_dir}", f"--model.init_args.backbone={backbone}",
                    f"--data.init_args.backbone={backbone}", "--model.init_args.language_adapters=null",
                    "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.logger=false",
                    "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
                    f"--trainer.callbacks.init_args.dirpath={tmp_path / 'adapters'}"], run=True)
    assert run.datamodule.hparams.lang == "sw" and run.trainer.global_step == 2
    assert (tmp_path / "adapters" / "ner" / "adapter_config.json").is_file()
    assert yaml.safe_load((CONFIGS / "wikiann-madx.yaml").read_text())["data"]["init_args"]["benchmark"] == "wikiann"
