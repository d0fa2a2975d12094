"""Lightning layer: modules, data, callbacks and the ``xlpeft`` CLI."""

from xlpeft.lightning.base import AdapterModule
from xlpeft.lightning.callbacks import AdapterExport
from xlpeft.lightning.generator import GeneratorMLM, HyperXTraining, MLMAndTaskDataModule
from xlpeft.lightning.mlm import MaskedLMAdaptation
from xlpeft.lightning.newscript import NewScriptEmbeddings
from xlpeft.lightning.task import TaskAdaptation
from xlpeft.lightning.tta import TestTimeAdaptation
from xlpeft.lightning.translation import TranslationAdaptation

__all__ = ["AdapterExport", "AdapterModule", "GeneratorMLM", "HyperXTraining", "MLMAndTaskDataModule",
           "MaskedLMAdaptation", "NewScriptEmbeddings", "TaskAdaptation", "TestTimeAdaptation",
           "TranslationAdaptation"]
