"""Evaluation metrics: no host reads per example, and equal under 2-process DDP and 1 process.

``HostReads`` counts the tensor calls made by xlpeft's own code that read
tensor values on the host (``.tolist()``, ``.item()``, ``float()``, ``.cpu()``,
``nonzero``, boolean indexing …) while a step runs, through a
``TorchFunctionMode``. On CPU they cost nothing, but each is a device
synchronisation on a GPU. Calls inside transformers/torchmetrics are not
counted (e.g. chrF's n-gram counting works on host tensors built from strings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lightning_tiny import save_tiny_backbone, tiny_bert_tokenizer
from test_ddp import run_worker
from xlpeft.lightning import MaskedLMAdaptation, TaskAdaptation, TranslationAdaptation

READS = {"tolist", "item", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero",
         "masked_select", "unique"}


class HostReads(TorchFunctionMode):
    """Counts calls that copy device values to the host (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if (name in READS or (name == "__getitem__" and _bool_index(args))) and _from_xlpeft():
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _from_xlpeft() -> bool:
    """Whether the Python frame that made the call is in the xlpeft package."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back  # skip torch's own Python wrappers (e.g. Tensor.__bool__ helpers)
    return frame is not None and frame.f_code.co_filename.startswith(XLPEFT)


TORCH = f"{Path(torch.__file__).parent}/"
XLPEFT = f"{Path(__file__).resolve().parent.parent / 'xlpeft'}/"


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("sync") / "tiny-bert"))


def _encode(texts: list[str]) -> dict:
    enc = tiny_bert_tokenizer()(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _reads(step, batch: dict) -> list[str]:
    with torch.no_grad(), HostReads() as reads:
        step(batch, 0)
    return reads.calls


def _extra_reads(module, step, batch: dict) -> list[str]:
    return _reads(step, batch)


@pytest.mark.parametrize("size", [4, 8])
def test_task_validation_reads_nothing_on_the_host(backbone, size):
    module = TaskAdaptation(backbone=backbone, labels=["neg", "pos"]).eval()
    batch = {**_encode(["the lord said", "na nchi ya maji"] * (size // 2)),
             "langs": ["eng", "swh"] * (size // 2), "labels": torch.tensor([0, 1] * (size // 2))}
    assert _extra_reads(module, module.validation_step, batch) == []
    assert module.scores.compute()["swh"]["examples"].item() == size // 2


@pytest.mark.parametrize("size", [4, 8])
def test_mlm_steps_read_the_host_once(backbone, size):
    module = MaskedLMAdaptation(backbone=backbone, languages=["eng", "swh"]).eval()
    batch = _encode(["the lord said unto them", "na nchi ya maji juu"] * (size // 2))
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 1:3] = batch["input_ids"][:, 1:3]
    batch = {**batch, "labels": labels, "langs": ["eng", "swh"] * (size // 2)}
    assert _extra_reads(module, module.validation_step, batch) == ["tolist"]  # the masked-token counts
    assert _extra_reads(module, module.training_step, batch) == ["tolist"]
    assert module.sums["swh"].compute()[2].item() == 2 * (size // 2)  # masked tokens counted per language


def test_translation_host_reads_do_not_grow_with_the_batch(backbone, tmp_path):
    L.seed_everything(0)
    module = TranslationAdaptation(backbone=backbone, languages=["eng", "swh"], decoder_layers=1,
                                   max_new_tokens=3).eval()
    tok = module.adapted.tokenizer

    def batch(n: int) -> dict:
        enc = tok(["the lord said"] * n, return_tensors="pt")
        labels = tok(["na nchi"] * n, return_tensors="pt")["input_ids"]
        return {**{k: enc[k] for k in ("input_ids", "attention_mask")}, "labels": labels,
                "src_langs": ["eng"] * n, "tgt_langs": ["swh", "eng"] * (n // 2),
                "references": ["na nchi"] * n}

    assert _reads(module.validation_step, batch(2)) == _reads(module.validation_step, batch(8)) == []


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_two_process_metrics_equal_one_process(tmp_path):
    """BLEU/chrF per direction and accuracy per language: the same under DDP as in one process.

    References equal the model's own translations on even rows and differ on odd
    ones, so each rank's half (rank 0 holds the even rows) scores unlike the whole.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from ddp_worker import TEXT, metrics_modules, validate_metrics

    save_tiny_backbone(tmp_path / "backbone")
    sources = [t for pair in zip(TEXT["eng"], TEXT["eng"][::-1]) for t in pair][:8]
    (tmp_path / "eng-swh.tsv").write_text("".join(f"{s}\tna nchi\n" for s in sources))
    (tmp_path / "task.tsv").write_text("".join(f"{t}\t{['neg', 'pos'][i % 2]}\t{lang}\n"
                                               for lang in ("eng", "swh") for i, t in enumerate(TEXT[lang])))
    nmt, data, _, _ = metrics_modules(tmp_path)
    data.setup("validate")
    hyps = [h for b in data.val_dataloader() for h in nmt.translate(b)]
    refs = [h if i % 2 == 0 else "juu ya uso wa maji na mungu" for i, h in enumerate(hyps)]
    (tmp_path / "eng-swh.tsv").write_text("".join(f"{s}\t{r}\n" for s, r in zip(sources, refs)))
    single = json.loads(json.dumps(validate_metrics(tmp_path, devices=1)))

    result = run_worker(tmp_path, "metrics")
    assert result.returncode == 0, result.stdout[-3000:]
    ranks = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        for kind in ("translation", "task"):
            assert got[kind].keys() == single[kind].keys(), (kind, got[kind], single[kind])
            for key, row in single[kind].items():
                assert got[kind][key] == pytest.approx(row, rel=1e-9), (kind, key, got[kind][key], row)
    assert single["translation"]["eng-swh"]["examples"] == 8
    assert {k: r["examples"] for k, r in single["task"].items()} == {"eng": 8, "swh": 8}
    assert 0 < single["translation"]["eng-swh"]["chrf"] < 100, single["translation"]
