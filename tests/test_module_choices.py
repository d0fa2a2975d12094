"""LightningModule arguments are refused before the backbone loads (Python and CLI).

A backbone path that does not exist stands for an expensive load: had the
module loaded anything before its checks, the error would be about the path.
"""

from __future__ import annotations

import pytest

from xlpeft.errors import XlpeftValueError
from xlpeft.lightning import MaskedLMAdaptation

NOWHERE = "/no/such/backbone"


def test_mlm_refuses_no_languages_before_loading():
    with pytest.raises(XlpeftValueError, match=r"`languages` can be one or more language codes .*got \[\]"):
        MaskedLMAdaptation(backbone=NOWHERE, languages=[])
