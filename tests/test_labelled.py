"""LabelledDataModule: TSV / JSONL / CoNLL-U files, label lists, alignment, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_tiny import save_tiny_backbone, snapshot, changed, tiny_bert_tokenizer, tiny_trainer
from xlpeft.data._common import MissingFileError
from xlpeft.data.collators import IGNORE
from xlpeft.data.corpora import treebank_paths
from xlpeft.data.labelled import LabelledDataModule, read_examples
from xlpeft.errors import CorruptFileError, XlpeftValueError
from xlpeft.lightning import TaskAdaptation


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("labelled") / "tiny-bert"))


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, rows: list[dict]) -> str:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def module_data(backbone: str, **kwargs) -> LabelledDataModule:
    dm = LabelledDataModule(backbone=backbone, batch_size=4, **kwargs)
    dm.tokenizer = tiny_bert_tokenizer()
    return dm


def test_tsv_labels_languages_and_ids(tmp_path, backbone):
    train = write(tmp_path / "train.tsv", "text\tlabel\tlang\nthe lord\tpos\t\nnot them\tneg\t\n"
                                          "na maji\tneg\tswh\n")
    test = write(tmp_path / "test.tsv", "mungu na nchi\tpos\n")
    dm = module_data(backbone, train=train, test={"swh": test}, language="eng")
    assert dm.labels == ["neg", "pos"]
    dm.setup()
    assert [r["lang"] for r in dm.datasets["train"]] == ["eng", "eng", "swh"]
    assert [r["label"] for r in dm.datasets["train"]] == [1, 0, 0]
    assert dm.datasets["test"][0]["lang"] == "swh" and dm.datasets["test"][0]["label"] == 1
    assert dm.datasets["train"][0]["input_ids"] == tiny_bert_tokenizer()("the lord")["input_ids"]
    batch = next(iter(dm.test_dataloader()))
    assert batch["langs"] == ["swh"] and batch["labels"].tolist() == [1]
    assert dm.val_dataloader() == [], "no validation file: fit runs without validation"


def test_token_tags_go_to_the_first_piece_of_each_word(tmp_path, backbone):
    rows = [{"tokens": ["hapo", "mwanzo", "mungu"], "tags": ["O", "B-TIME", "B-PER"], "lang": "swh"},
            {"tokens": ["the", "lord", "said"], "tags": ["O", "B-PER", "O"]}]
    dm = module_data(backbone, train=jsonl(tmp_path / "train.jsonl", rows), task="token-cls")
    assert dm.labels == ["B-PER", "B-TIME", "O"]
    dm.setup("fit")
    row = dm.datasets["train"][0]
    words = tiny_bert_tokenizer()(["hapo", "mwanzo", "mungu"], is_split_into_words=True).word_ids()
    assert words == [None, 0, 1, 1, 1, 1, 1, 1, 2, None], "mwanzo must be several pieces"
    assert row["label"] == [IGNORE, 2, 1, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 0, IGNORE]
    assert [r["lang"] for r in dm.datasets["train"]] == ["swh", "eng"]


def test_tsv_token_task_splits_words_and_tags(tmp_path):
    path = write(tmp_path / "t.tsv", "the lord said\tO B-PER O\n")
    assert read_examples(path, "token-cls")[0].label == ("O", "B-PER", "O")
    bad = write(tmp_path / "bad.tsv", "the lord said\tO B-PER\n")
    with pytest.raises(CorruptFileError, match=r"bad.tsv:1: a token example needs one tag per word; got 3 words and 2"):
        read_examples(bad, "token-cls")


def test_turkish_treebank_upos_through_token_classification(tmp_path, backbone):
    web = treebank_paths()["web"]
    dm = module_data(backbone, train={"tur": str(web)}, task="token-cls", max_examples=12, max_length=32)
    assert {"NOUN", "VERB", "PUNCT"} <= set(dm.labels)
    assert all(ex.lang == "tur" for ex in dm.examples("train"))
    assert dm.examples("train")[0].text[:2] == ("Burda", "da")
    module = TaskAdaptation(backbone=backbone, labels=dm.labels, task="token-cls", source_language="tur", lr=1e-2)
    before = snapshot(module)
    tiny_trainer(3).fit(module, dm)
    assert any(k.startswith("head.") for k in changed(before, module))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(MissingFileError, match="labelled file .*nowhere.tsv does not exist"):
        read_examples(tmp_path / "nowhere.tsv")
    with pytest.raises(MissingFileError, match="nowhere.conllu does not exist"):
        read_examples(tmp_path / "nowhere.conllu", "token-cls")
    with pytest.raises(CorruptFileError, match=r"empty.jsonl: no examples \(the file is empty\)"):
        read_examples(write(tmp_path / "empty.jsonl", "\n\n"))


def test_unseen_test_labels_are_listed(tmp_path, backbone):
    train = write(tmp_path / "train.tsv", "a\tpos\nb\tneg\n")
    test = write(tmp_path / "test.tsv", "c\tpos\nd\tmixed\ne\tangry\n")
    dm = module_data(backbone, train=train, test=test)
    with pytest.raises(XlpeftValueError,
                       match=r"test.tsv: labels \['angry', 'mixed'\] in the test data do not occur in the "
                             r"training data .*\['neg', 'pos'\]; add them to `labels`"):
        dm.setup("test")
    given = module_data(backbone, train=train, test=test, labels=["neg", "pos", "mixed", "angry"])
    given.setup("test")
    assert [r["label"] for r in given.datasets["test"]] == [1, 2, 3]


def test_malformed_lines_name_file_and_line(tmp_path):
    conllu = write(tmp_path / "bad.conllu", "# text = a b\n1\ta\ta\tNOUN\t_\t_\t0\troot\t_\t_\n2\tb\tb\tVERB\n")
    with pytest.raises(CorruptFileError, match=r"bad.conllu:3: a CoNLL-U token line has 10 tab-separated columns; got 4"):
        read_examples(conllu, "token-cls")
    tsv = write(tmp_path / "bad.tsv", "a\tpos\nb\tneg\tswh\textra\n")
    with pytest.raises(CorruptFileError, match=r"bad.tsv:2: a TSV line has 2 or 3 tab-separated columns .*got 4"):
        read_examples(tsv)
    broken = write(tmp_path / "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n')
    with pytest.raises(CorruptFileError, match=r"bad.jsonl:2: not a JSON object"):
        read_examples(broken)
    keys = jsonl(tmp_path / "keys.jsonl", [{"text": "a", "tag": "x"}])
    with pytest.raises(CorruptFileError, match=r"keys.jsonl:1: a seq-cls JSONL line needs keys \['text', 'label'\].*got \['tag', 'text'\]"):
        read_examples(keys)


def test_format_task_and_label_count_errors(tmp_path, backbone):
    with pytest.raises(XlpeftValueError, match=r"data.csv: the file format can be tsv, jsonl, conllu .*got suffix '.csv'"):
        read_examples(write(tmp_path / "data.csv", "a,b\n"))
    with pytest.raises(XlpeftValueError, match="`format` can be tsv, jsonl, conllu; got 'xml'"):
        read_examples(tmp_path / "data.csv", format="xml")
    with pytest.raises(XlpeftValueError, match="a CoNLL-U file holds word tags .*use task='token-cls'"):
        read_examples(treebank_paths()["web"], "seq-cls")
    with pytest.raises(XlpeftValueError, match="`task` can be seq-cls, token-cls; got 'ner'"):
        LabelledDataModule(train="x.tsv", task="ner")
    one = module_data(backbone, train=write(tmp_path / "one.tsv", "a\tpos\nb\tpos\n"))
    with pytest.raises(XlpeftValueError, match=r"training data has labels \['pos'\]; a classifier needs at least two"):
        _ = one.labels
    with pytest.raises(XlpeftValueError, match="give a `train` file"):
        LabelledDataModule()
