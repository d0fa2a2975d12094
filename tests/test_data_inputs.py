"""Bad inputs give project errors naming the input; nothing is silently mis-read.

Before: non-UTF-8 files raised a bare ``UnicodeDecodeError`` (no path);
``str.splitlines`` also split on form feed and U+2028 (two aligned 12-line
files became 13 pairs, 4 misaligned); ``languages=[]``, a direction with no
train file, ``max_*=0`` and ``max_length`` 0/1 were accepted and crashed (or
meant "all") later; a typo in a ``files`` key fell back to the embedded
corpus; a corpus of zero-width characters trained with a NaN loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_tiny import save_tiny_backbone, tiny_trainer
from xlpeft.data.conllu import read_conllu
from xlpeft.data.corpora import read_text_file
from xlpeft.data.datamodules import GenreDataModule, MLMDataModule
from xlpeft.data.labelled import LabelledDataModule, read_examples
from xlpeft.data.parallel import read_aligned, read_pairs
from xlpeft.data.parallel_datamodule import ParallelDataModule
from xlpeft.errors import CorruptFileError, XlpeftValueError
from xlpeft.lightning import MaskedLMAdaptation

LATIN1 = "caf\xe9 au lait\tcoffee\n".encode("latin-1")
SEPARATORS = ["\u2028", "\x0c", "\x1c", "\x85", "\u2029"]  # str.splitlines splits on all of these


@pytest.mark.parametrize("reader", [
    lambda p: read_pairs(str(p), "fra", "eng"),
    lambda p: read_examples(p, "seq-cls"),
    lambda p: read_text_file(p),
], ids=["parallel-tsv", "labelled-tsv", "text"])
def test_a_non_utf8_file_is_an_error_naming_it(tmp_path, reader):
    path = tmp_path / "latin1.tsv"
    path.write_bytes(b"first line\tok\n" + LATIN1)
    with pytest.raises(CorruptFileError, match=rf"latin1.tsv:2: .* is not UTF-8 .*re-encode it as UTF-8"):
        reader(path)


def test_non_utf8_aligned_and_conllu_files_name_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("one\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\n")
    with pytest.raises(CorruptFileError, match=r"b.txt:1: parallel data file is not UTF-8"):
        read_aligned(tmp_path / "a.txt", tmp_path / "b.txt", "fra", "eng")
    (tmp_path / "x.conllu").write_bytes(b"1\tcaf\xe9\t_\tNOUN\n")
    with pytest.raises(CorruptFileError, match=r"x.conllu:1: CoNLL-U file is not UTF-8"):
        read_conllu(tmp_path / "x.conllu")


def test_aligned_files_split_on_newlines_only(tmp_path):
    src = [f"source {i}" + (f" with{SEPARATORS[i % 5]}inside" if i % 3 == 0 else "") for i in range(12)]
    tgt = [f"target {i}" for i in range(12)]
    (tmp_path / "src.txt").write_text("\n".join(src) + "\n", encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("\r\n".join(tgt) + "\r\n", encoding="utf-8", newline="")
    pairs = read_aligned(tmp_path / "src.txt", tmp_path / "tgt.txt", "fra", "eng")
    assert len(pairs) == 12
    assert all(p.tgt == f"target {i}" and p.src.startswith(f"source {i}") for i, p in enumerate(pairs))


def test_tsv_text_and_labelled_lines_keep_separators_inside_a_line(tmp_path):
    (tmp_path / "p.tsv").write_text("a\u2028b\tx\x0cy\nc\td\n", encoding="utf-8")
    # one pair per line; inside a pair, whitespace (U+2028 and form feed are whitespace) collapses to a space
    assert [(p.src, p.tgt) for p in read_pairs(str(tmp_path / "p.tsv"), "fra", "eng")] == [("a b", "x y"), ("c", "d")]
    (tmp_path / "t.txt").write_text("\ufeffone\u2028still one\ntwo\n", encoding="utf-8")
    assert read_text_file(tmp_path / "t.txt") == ["one\u2028still one", "two"]  # BOM dropped
    (tmp_path / "l.tsv").write_text("good\u2028text\tpos\r\nbad\tneg\r\n", encoding="utf-8", newline="")
    assert [(e.text, e.label) for e in read_examples(tmp_path / "l.tsv")] == [("good\u2028text", "pos"),
                                                                             ("bad", "neg")]


@pytest.mark.parametrize("make, match", [
    (lambda: MLMDataModule(languages=[]), r"`languages` can be a non-empty list .*got \[\]"),
    (lambda: MLMDataModule(max_train_lines=0), r"`max_train_lines` can be a positive integer or None .*got 0"),
    (lambda: MLMDataModule(max_eval_lines=-1), r"`max_eval_lines` can be a positive integer"),
    (lambda: MLMDataModule(max_length=1), r"`max_length` can be an integer >= 3 .*got 1"),
    (lambda: MLMDataModule(batch_size=0), r"`batch_size` can be a positive integer; got 0"),
    (lambda: MLMDataModule(temperature=0), r"`temperature` can be a number > 0; got 0"),
    (lambda: MLMDataModule(languages=["swh"], files={"swa": "swa.txt"}),
     r"`files` keys can be the languages being trained \(swh\); got 'swa'"),
    (lambda: GenreDataModule(max_per_genre=0), r"`max_per_genre` can be a positive integer"),
    (lambda: GenreDataModule(max_length=0), r"`max_length` can be an integer >= 3 .*got 0"),
    (lambda: ParallelDataModule(max_train_pairs=0), r"`max_train_pairs` can be a positive integer"),
    (lambda: ParallelDataModule(max_length=1), r"`max_length` can be an integer >= 3"),
    (lambda: ParallelDataModule(directions=["spa-nah"], files={"spa-nhe": {"train": "x.tsv"}}),
     r"`files` keys can be the directions given \(spa-nah\); got 'spa-nhe'"),
    (lambda: ParallelDataModule(directions=["spa-nah"], files={"spa-nah": {"train": "x", "valid": "y"}}),
     r"`files\['spa-nah'\]` keys can be train, validation, test; got 'valid'"),
    (lambda: LabelledDataModule(train="x.tsv", max_examples=0), r"`max_examples` can be a positive integer"),
    (lambda: LabelledDataModule(train="x.tsv", max_length=2), r"`max_length` can be an integer >= 3 .*got 2"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments_are_refused_up_front(make, match):
    with pytest.raises(XlpeftValueError, match=match):
        make()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("inputs") / "tiny-bert")


def test_a_direction_without_a_train_file_is_refused_at_setup(tmp_path):
    (tmp_path / "val.tsv").write_text("hola\thello\n", encoding="utf-8")
    dm = ParallelDataModule(directions=["spa-eng"], files={"spa-eng": {"validation": str(tmp_path / "val.tsv")}})
    dm.format = object()  # set up without a backbone: the check comes before any tokenizer use
    with pytest.raises(XlpeftValueError, match=r"`files` for 'spa-eng' can train only with a 'train' entry; "
                                               r"got spa-eng: \['validation'\]"):
        dm._check_train_files()


def test_a_zero_width_corpus_is_refused_naming_the_language_and_file(backbone, tmp_path):
    (tmp_path / "eng.txt").write_text("the lord said unto them\n" * 40, encoding="utf-8")
    (tmp_path / "swh.txt").write_text("\u200b\u200b\u200b\n" * 40, encoding="utf-8")
    data = MLMDataModule(languages=["eng", "swh"], backbone=str(backbone), batch_size=4, max_length=16,
                         files={lang: str(tmp_path / f"{lang}.txt") for lang in ("eng", "swh")})
    with pytest.raises(XlpeftValueError, match=r"training lines of swh \(.*swh.txt\) can be masked-LM data only if "
                                               r"they hold some text token"):
        data.setup("fit")
        data.train_dataloader()


class NaNAtStep(MaskedLMAdaptation):
    """A loss that turns NaN at one step, as a batch with no masked token does."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 2 else loss


def test_a_nan_loss_stops_training_naming_step_and_languages(backbone, tmp_path):
    (tmp_path / "swh.txt").write_text("na nchi ya maji\n" * 40, encoding="utf-8")
    data = MLMDataModule(languages=["swh"], backbone=str(backbone), files={"swh": str(tmp_path / "swh.txt")},
                         batch_size=4, max_length=16)
    module = NaNAtStep(backbone=str(backbone), languages=["swh"], lr=1e-2)
    with pytest.raises(XlpeftValueError, match=r"training loss is NaN or infinite at step 2 \(epoch 0, batch 2; "
                                               r"languages in the batch: swh\); training stopped"):
        tiny_trainer(5, limit_val_batches=0).fit(module, data)
    after = module.adapted.adapter_state_dict("swh")
    assert all(v.isfinite().all() for v in after.values()), "the NaN step must not reach the weights"


def test_the_loss_guard_names_the_languages_of_any_batch_and_catches_inf():
    from xlpeft.lightning.guard import LossGuard, batch_languages
    assert batch_languages({"mlm": {"langs": ["swh", "eng"]}, "task": {"langs": ["eng"]}}) == ["eng", "swh"]
    guard = LossGuard()
    guard.start({"langs": ["eng"]}, 6, 1, 0)
    guard.check(torch.tensor(2.5), every=50)  # finite: nothing raised
    guard.start({"src_langs": ["spa"], "tgt_langs": ["nah"]}, 7, 1, 1)
    with pytest.raises(XlpeftValueError, match=r"step 7 \(epoch 1, batch 1; languages in the batch: nah, spa\)"):
        guard.check(torch.tensor(float("inf")), every=50)
