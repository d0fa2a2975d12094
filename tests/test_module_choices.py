"""LightningModule arguments are refused before the backbone loads (Python and CLI).

A backbone path that does not exist stands for an expensive load: had the
module loaded anything before its checks, the error would be about the path.
"""

from __future__ import annotations

import re
import typing

import pytest

from xlpeft.errors import XlpeftValueError
from xlpeft.lightning import GeneratorMLM, MaskedLMAdaptation, TaskAdaptation, TranslationAdaptation
from xlpeft.lightning.mlm import TRAIN
from xlpeft.lightning.task import EVAL_MODES, TASKS, TRAIN_MODES
from xlpeft.lightning.translation import BACKBONE_PARTS, MODULES

NOWHERE = "/no/such/backbone"
AB = ["a", "b"]


def test_mlm_refuses_no_languages_before_loading():
    with pytest.raises(XlpeftValueError, match=r"`languages` can be one or more language codes .*got \[\]"):
        MaskedLMAdaptation(backbone=NOWHERE, languages=[])


@pytest.mark.parametrize("make, message", [
    (lambda: MaskedLMAdaptation(backbone=NOWHERE, train="bogus"), "`train` can be 'adapters', 'head'; got 'bogus'"),
    (lambda: TaskAdaptation(backbone=NOWHERE, labels=AB, task="bogus"), "`task` can be seq-cls, token-cls"),
    (lambda: TaskAdaptation(backbone=NOWHERE, labels=AB, eval_mode="bogus"), "`eval_mode` can be own, source"),
    (lambda: TaskAdaptation(backbone=NOWHERE, labels=AB, train_mode="bogus"), "`train_mode` can be source, own"),
    (lambda: TranslationAdaptation(backbone=NOWHERE, modules="bogus"), "`modules` can be monolingual, pair, none"),
    (lambda: TranslationAdaptation(backbone=NOWHERE, train_backbone="bogus"), "`train_backbone` can be none, all"),
], ids=["mlm-train", "task", "eval_mode", "train_mode", "modules", "train_backbone"])
def test_python_callers_keep_the_in_code_checks_before_loading(make, message):
    with pytest.raises(XlpeftValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("cls, name, choices", [
    (MaskedLMAdaptation, "train", TRAIN),
    (TaskAdaptation, "task", TASKS), (TaskAdaptation, "eval_mode", EVAL_MODES),
    (TaskAdaptation, "train_mode", TRAIN_MODES),
    (TranslationAdaptation, "modules", MODULES), (TranslationAdaptation, "train_backbone", tuple(BACKBONE_PARTS)),
    (GeneratorMLM, "generator", ("madg", "hyperx")),
])
def test_choice_arguments_are_literals_of_the_checked_values(cls, name, choices):
    hint = typing.get_type_hints(cls.__init__)[name]
    assert typing.get_origin(hint) is typing.Literal and typing.get_args(hint) == choices


@pytest.mark.parametrize("model, arg, message", [
    ("xlpeft.lightning.TaskAdaptation", "--model.init_args.eval_mode=mine",
     "`model.init_args.eval_mode` can be 'own', 'source', 'none'; got 'mine'"),
    ("xlpeft.lightning.TaskAdaptation", "--model.task=ner",
     "`model.init_args.task` can be 'seq-cls', 'token-cls'; got 'ner'"),
    ("xlpeft.lightning.TranslationAdaptation", "--model.train_backbone=encoder",
     "`model.init_args.train_backbone` can be 'none', 'all', 'decoder', 'cross-attention'; got 'encoder'"),
    ("xlpeft.lightning.GeneratorMLM", "--model.generator=madx",
     "`model.init_args.generator` can be 'madg', 'hyperx'; got 'madx'"),
])
def test_the_cli_refuses_a_bad_choice_while_parsing(model, arg, message, tmp_path, capsys):
    from xlpeft.lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--model={model}", f"--model.backbone={NOWHERE}", "--data=xlpeft.data.datamodules.MLMDataModule",
              f"--trainer.default_root_dir={tmp_path}", arg])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"xlpeft: error: {message}\n"
