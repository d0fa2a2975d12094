"""Bring your own language: a language with no card and no embedded data, from the user's files.

Its MLM text and a verse-aligned Bible (TSV or JSON chapters) go through the same
harness as the embedded languages: language adapter, genre passages on the same
chapter split, typology / ensemble / EMEA setups, tables with CIs — and the
checks that keep a wrong file or a mismatched tokenizer from failing obscurely.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_tiny import save_tiny_backbone
from xlpeft.data.bible import Verse, bible_verses, chapter_split
from xlpeft.data.bible_files import USFM_BOOKS, book_number, read_bible
from xlpeft.data.datamodules import MLMDataModule, read_split_files
from xlpeft.data.genre import genre_examples
from xlpeft.errors import CorruptFileError, XlpeftValueError

OWN = "yor"  # no card in languages/, no embedded corpus or Bible; lang2vec knows it


def _own_text(verse: Verse) -> str:
    """A stand-in 'Yoruba' text: the English verse with its words reversed (same chapters, other text)."""
    return " ".join(reversed(verse.text.split()))


@pytest.fixture(scope="module")
def own_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's Bible (TSV with USFM ids and a header) and MLM text file for ``yor``."""
    root = tmp_path_factory.mktemp("own")
    verses = [v for v in bible_verses("eng") if v.book in (1, 19, 40, 45, 66) or v.book % 9 == 0]
    bible = root / "yor-bible.tsv"
    bible.write_text("book\tchapter\tverse\ttext\n" + "".join(
        f"{USFM_BOOKS[v.book - 1].lower() if v.book % 2 else v.book}\t{v.chapter}\t{v.verse}\t{_own_text(v)}\n"
        for v in verses), encoding="utf-8")
    text = root / "yor.txt"
    text.write_text("\n".join(_own_text(v) for v in verses[:200]) + "\n", encoding="utf-8")
    return {"bible": bible, "text": text}


# ------------------------------------------------------------------------------------ Bible files


def test_tsv_bible_reads_numbers_usfm_ids_and_a_header(own_files) -> None:
    verses = read_bible(own_files["bible"])
    assert {v.book for v in verses} >= {1, 19, 40, 45, 66}
    first = next(v for v in verses if v.book == 40)
    eng = next(v for v in bible_verses("eng") if v[:3] == first[:3])
    assert first.text == _own_text(eng)
    assert verses == sorted(verses, key=lambda v: v[:3])


def test_json_chapter_folder_in_both_layouts(tmp_path) -> None:
    (tmp_path / "MAT").mkdir()
    (tmp_path / "MAT" / "1.json").write_text(json.dumps({"book": "MAT", "chapter": 1, "verses": {"2": "b", "1": "a"}}))
    (tmp_path / "rev-22.json").write_text(json.dumps(
        {"book": 66, "chapter": 22, "verses": [{"verse": 21, "text": "Amen"}]}))
    assert read_bible(tmp_path) == [Verse(40, 1, 1, "a"), Verse(40, 1, 2, "b"), Verse(66, 22, 21, "Amen")]


@pytest.mark.parametrize("line, match", [
    ("GEN\t1\t1", r"bible.tsv:1: a line can be book<TAB>chapter<TAB>verse<TAB>text; got 3"),
    ("XYZ\t1\t1\tt", r"bible.tsv:1: book can be a number 1..66 or a USFM id .*got 'XYZ'"),
    ("67\t1\t1\tt", r"book can be a number 1..66"),
    ("JUD\t2\t1\tt", r"book JUD has 1 chapters \(KJV versification\); got chapter 2"),
    ("GEN\t0\t1\tt", r"chapter can be a positive integer; got '0'"),
    ("GEN\t1\tx\tt", r"verse can be a positive integer; got 'x'"),
    ("GEN\t1\t1\ta\nGEN\t1\t1\tb", r"verse GEN 1:1 occurs twice"),
])
def test_bad_bible_lines_name_file_and_line(tmp_path, line, match) -> None:
    path = tmp_path / "bible.tsv"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(XlpeftValueError, match=match):
        read_bible(path)


def test_bad_bible_inputs(tmp_path) -> None:
    with pytest.raises(XlpeftValueError, match="no such Bible file or folder"):
        read_bible(tmp_path / "missing.tsv")
    with pytest.raises(XlpeftValueError, match=r"found none"):
        read_bible(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not a UTF-8 JSON chapter"):
        read_bible(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"book": 1, "verses": {}}))
    with pytest.raises(XlpeftValueError, match="keys book, chapter, verses"):
        read_bible(tmp_path)
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("GEN\t1\t1\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(CorruptFileError, match="not UTF-8 text"):
        read_bible(latin1)
    assert book_number("gen", "x") == 1 and book_number("66", "x") == 66


def test_own_bible_passages_align_with_the_embedded_split(own_files) -> None:
    """Same chapters in the same split, same passage keys as English: pairs across languages."""
    own = genre_examples(OWN, "test", passage=4, verses=read_bible(own_files["bible"]))
    eng = genre_examples("eng", "test", passage=4)
    assert own and all(chapter_split(r["book"], r["chapter"]) == "test" for r in own)
    keys = {(r["book"], r["chapter"], r["verse"]) for r in own}
    assert keys <= {(r["book"], r["chapter"], r["verse"]) for r in eng}
    assert {r["lang"] for r in own} == {OWN}


# ------------------------------------------------------------------------------------ MLM files


def test_mlm_files_per_split(tmp_path) -> None:
    files = {}
    for split, n in (("train", 7), ("validation", 2), ("test", 3)):
        files[split] = str(tmp_path / f"{split}.txt")
        Path(files[split]).write_text("\n".join(f"{split} line {i}" for i in range(n)) + "\n", encoding="utf-8")
    out = read_split_files(files, OWN)
    assert [len(out[s]) for s in ("train", "validation", "test")] == [7, 2, 3]
    assert out["test"] == ["test line 0", "test line 1", "test line 2"]
    with pytest.raises(XlpeftValueError, match=r"exactly the keys train, validation, test; got keys \['train'\]"):
        read_split_files({"train": files["train"]}, OWN)
    Path(files["test"]).write_text("\n", encoding="utf-8")
    with pytest.raises(XlpeftValueError, match=r"test.txt: the text file is empty"):
        read_split_files(files, OWN)


# ------------------------------------------------------------------------------------ language codes


def test_iso_639_1_codes_resolve_for_uncarded_languages() -> None:
    from xlpeft.generators.averaging import typology_weights
    from xlpeft.typology import uriel_code
    assert uriel_code("yo") == "yor" and uriel_code("ha") == "hau"
    weights = typology_weights("ha", ["eng", "swh", "yo"])
    assert set(weights) == {"eng", "swh", "yo"} and abs(sum(weights.values()) - 1) < 1e-6


# ------------------------------------------------------------------------------------ the harness


def test_vocabulary_and_calibration_texts_include_the_users_files(own_files) -> None:
    from xlpeft.lightning.demo import DemoConfig, demo_texts
    cfg = DemoConfig(languages=("eng", OWN), calibration_languages=("eng",), genre_targets=(OWN,),
                     lines_per_language=5, texts={OWN: str(own_files["text"])}, bibles={OWN: str(own_files["bible"])})
    texts = set(demo_texts(cfg))
    assert set(own_files["text"].read_text(encoding="utf-8").split("\n")[:-1]) <= texts
    assert {v.text for v in read_bible(own_files["bible"])} & texts  # its Bible passages too


def _config(tmp_path: Path, own_files: dict[str, Path], backbone: str, **extra) -> dict:
    return {"out": str(tmp_path / "out"), "backbone": backbone, "targets": [OWN], "passage": 4, "max_length": 16,
            "per_genre": 2, "eval_per_genre": 1, "seeds": [0, 1], "batch_size": 4, "lines_per_language": 20,
            "bootstrap": 50, "emea_steps": 2, "texts": {OWN: str(own_files["text"])},
            "bibles": {OWN: str(own_files["bible"])},
            "recipes": [{"name": "tiny", "adapter": {"method": "bottleneck", "reduction_factor": 4},
                         "task_adapter": {"method": "bottleneck", "reduction_factor": 4},
                         "adapter_steps": 2, "task_steps": 2}], **extra}


def test_xlpeft_evaluate_runs_a_users_language_end_to_end(tmp_path, own_files, capsys) -> None:
    """`xlpeft evaluate --config` on a language known only from files: every setup, CIs, files."""
    from xlpeft.lightning.cli import main
    backbone = str(save_tiny_backbone(tmp_path / "tiny-bert"))
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, own_files, backbone, extra_languages=["tgl"])))
    main(["evaluate", "--config", str(config), "--seeds", "[0]"])
    results = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert results["config"]["seeds"] == [0]  # the flag after --config wins
    row = results["recipes"][0]["languages"][OWN]
    assert row["role"] == "zero-shot target" and row["examples"] > 0
    for setup in ("none", "source", "own", "typology", "uniform", "emea"):
        assert row[setup]["lo"] <= row[setup]["acc"] <= row[setup]["hi"]
        assert sum(map(sum, row["confusion"][setup])) == row["examples"]
    assert {"own_minus_source", "emea_minus_uniform", "source_minus_none"} <= set(row)
    source = results["recipes"][0]["languages"]["eng"]
    assert "emea" not in source and "typology" not in source  # built from *other* languages: targets only
    adapters = next((tmp_path / "out" / "cache").glob("lang-*"))
    assert sorted(p.name for p in adapters.iterdir() if p.is_dir()) == ["eng", "tgl", OWN]
    md = (tmp_path / "out" / "transfer.md").read_text()
    assert "EMEA" in md and "Δ EMEA − uniform ensemble" in md and f"| {OWN} | zero-shot target |" in md
    assert (tmp_path / "out" / "transfer.png").stat().st_size > 0
    assert "| recipe | source acc | yor |" in capsys.readouterr().out


def test_madg_recipe_generates_target_adapters_it_never_trained_on(tmp_path, own_files) -> None:
    from xlpeft.lightning.transfer import EvalConfig, Recipe, run
    backbone = str(save_tiny_backbone(tmp_path / "tiny-bert"))
    cfg = _config(tmp_path, own_files, backbone, setups=["none", "source", "own"], seeds=[0])
    cfg["recipes"] = [Recipe("MAD-G", generator="madg", generator_languages=("eng", "spa"),
                             generator_config={"reduction_factor": 4, "basis": 2, "language_dim": 4},
                             task_adapter="pfeiffer", adapter_steps=2, task_steps=2)]
    results = run(EvalConfig(**cfg), quiet=True)
    row = results["recipes"][0]["languages"][OWN]
    assert {"own", "own_minus_none"} <= set(row)
    folder = next((tmp_path / "out" / "cache").glob("lang-*"))
    meta = json.loads((folder / OWN / "adapter_config.json").read_text())
    assert meta["generated"]["language"] == OWN and meta["generated"]["generator"] == "madg"
    with pytest.raises(XlpeftValueError, match=r"`generator_languages` can hold no target .*\['yor'\]"):
        bad = dict(cfg, out=str(tmp_path / "bad"))
        bad["recipes"] = [Recipe("leak", generator="madg", generator_languages=("eng", OWN), adapter_steps=1)]
        run(EvalConfig(**bad), quiet=True)


@pytest.mark.parametrize("field, value, match", [
    ("setups", ["own", "magic"], r"`setups` can be a non-empty subset of none, source, own"),
    ("targets", ["eng"], r"`targets` can hold languages other than the source 'eng'"),
    ("seeds", [], r"`seeds` can be one or more task seeds"),
])
def test_eval_config_refuses_bad_fields(field, value, match) -> None:
    from xlpeft.lightning.transfer import EvalConfig
    with pytest.raises(XlpeftValueError, match=match):
        EvalConfig(**{field: value})


# ------------------------------------------------------------------------------------ mismatches


def test_a_tokenizer_that_does_not_fit_the_embeddings_is_a_clear_error(tmp_path) -> None:
    import lightning as L

    from xlpeft.lightning.mlm import MaskedLMAdaptation
    small = str(save_tiny_backbone(tmp_path / "model"))
    module = MaskedLMAdaptation(small, languages=["eng"], adapter={"method": "bottleneck", "reduction_factor": 4})
    data = MLMDataModule(["eng"], backbone="other-folder", max_train_lines=8, batch_size=2)
    data.tokenizer = type("Big", (), {"__len__": lambda self: 10**6})()
    data.setup = lambda stage=None: None  # keep the stand-in tokenizer
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(XlpeftValueError, match=r"the data's tokenizer \(other-folder: 1000000 tokens\) does not "
                                               r"match the model's embeddings .*leave `data.init_args.backbone` out"):
        trainer.fit(module, data)


def test_task_labels_in_another_order_than_the_data_are_refused(tmp_path) -> None:
    import lightning as L

    from xlpeft.data.labelled import LabelledDataModule
    from xlpeft.lightning.task import TaskAdaptation
    backbone = str(save_tiny_backbone(tmp_path / "model"))
    train = tmp_path / "train.tsv"
    train.write_text("good film\tpos\nbad film\tneg\nfine film\tpos\n", encoding="utf-8")
    data = LabelledDataModule(train=str(train), backbone=backbone, batch_size=2)
    assert data.labels == ["neg", "pos"]  # sorted, as documented, when nobody gives them
    module = TaskAdaptation(backbone, labels=["pos", "neg"], adapter={"method": "bottleneck", "reduction_factor": 4})
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(XlpeftValueError, match=r"the data's labels \['neg', 'pos'\] differ from the model's "
                                               r"\['pos', 'neg'\] \(order gives the label ids\)"):
        trainer.fit(module, data)


def test_cli_copies_labels_to_the_side_that_lacks_them_in_order() -> None:
    from jsonargparse import Namespace

    from xlpeft.lightning.cli import derive_shared
    model = Namespace(class_path="xlpeft.lightning.TaskAdaptation", init_args=Namespace(labels=["pos", "neg"]))
    data = Namespace(class_path="xlpeft.data.labelled.LabelledDataModule", init_args=Namespace(labels=None))
    derive_shared(model, data)
    assert data.init_args.labels == ["pos", "neg"]
    data.init_args.labels = ["neg", "pos"]
    with pytest.raises(XlpeftValueError, match=r"differ \(\['pos', 'neg'\] vs \['neg', 'pos'\]\); the order gives"):
        derive_shared(model, data)


def test_shipped_evaluate_config_parses() -> None:
    from xlpeft.lightning.evaluate import config_from
    from xlpeft.lightning.transfer import Recipe
    root = Path(__file__).resolve().parents[1]
    cfg = config_from(["--config", str(root / "configs" / "evaluate" / "genre-transfer.yaml"), "--seeds", "[5]"])
    assert cfg.seeds == (5,) and cfg.targets == ("swh", "tgl") and len(cfg.recipes) == 2
    assert all(isinstance(r, Recipe) for r in cfg.recipes) and cfg.recipes[1].generator == "madg"
