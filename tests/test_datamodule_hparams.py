"""DataModule hyperparameters: explicit, complete, and kept out of the logger.

Regressions found by running the YAML configs through ``xlpeft fit``: a
DataModule built inside another one lost its own arguments (frame inspection),
and Lightning refused to start when module and data logged a same-named key
(``languages``) with different values.
"""

import lightning as L
import pytest

from xlpeft.data.datamodules import GenreDataModule, MLMDataModule
from xlpeft.data.parallel_datamodule import ParallelDataModule
from xlpeft.lightning.generator import MLMAndTaskDataModule


def test_nested_datamodules_keep_their_own_arguments():
    data = MLMAndTaskDataModule(languages=["eng", "swh"], task_language="eng", eval_languages=["tgl"])
    assert data.mlm.hparams.whole_word is False
    assert list(data.mlm.hparams.languages) == ["eng", "swh"]
    assert list(data.task.hparams.eval_languages) == ["tgl"]
    assert "whole_word" not in data.hparams


@pytest.mark.parametrize("make", [
    lambda: MLMDataModule(["eng"]),
    lambda: GenreDataModule("eng", ["swh"]),
    lambda: ParallelDataModule(directions=["spa-eng"]),
])
def test_datamodule_hparams_are_not_logged(make):
    data = make()
    assert isinstance(data, L.LightningDataModule)
    assert data._log_hyperparams is False
    assert "self" not in data.hparams and "__class__" not in data.hparams
