"""DDP worker for ``test_ddp.py``: 2 CPU processes (gloo) train language adapters.

    python tests/ddp_worker.py OUTDIR

Builds the tiny backbone folder in OUTDIR/backbone, trains MaskedLMAdaptation
(eng + swh, routed) for a few steps under DDP, then each rank writes its
adapter tensors to OUTDIR/rank<r>.safetensors (and rank 0 the initial ones to
OUTDIR/init.safetensors); AdapterExport writes OUTDIR/adapters once. Then the
same trainer validates the MLM module and a TaskAdaptation (eng/swh TSV), and
each rank writes its per-language results to OUTDIR/results<r>.json.

    python tests/ddp_worker.py OUTDIR metrics

validates (no training) a TranslationAdaptation and a TaskAdaptation built by
``metrics_modules`` on OUTDIR's files (written by ``test_metrics_sync.py``) and
writes each rank's results to OUTDIR/metrics<r>.json.

The strategy is ``ddp_find_unused_parameters_true``: with per-example routing a
rank's batch may lack a language, leaving that adapter without gradient, and
plain ``"ddp"`` then hangs in the all-reduce (MaskedLMAdaptation refuses it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_tiny import save_tiny_backbone  # noqa: E402
from xlpeft.data.datamodules import MLMDataModule  # noqa: E402
from xlpeft.data.labelled import LabelledDataModule  # noqa: E402
from xlpeft.lightning import AdapterExport, MaskedLMAdaptation, TaskAdaptation  # noqa: E402

LANGS = ["eng", "swh"]
TEXT = {
    "eng": ["the lord said unto them", "and he shall be with him", "thou shall not", "they be not for them",
            "in the beginning", "and the earth", "all of them", "he is the lord"],
    "swh": ["hapo mwanzo mungu", "na nchi ya maji", "juu ya uso wa maji", "mungu katika nchi",
            "kwa maji na nchi", "la mungu", "wa nchi juu", "za maji"],
}


def adapter_tensors(module: MaskedLMAdaptation) -> dict[str, torch.Tensor]:
    return {f"{lang}/{k}": v.detach().clone().contiguous()
            for lang in LANGS for k, v in module.adapted.adapter_state_dict(lang).items()}


def validate_task(trainer: L.Trainer, backbone: Path, out: Path) -> dict:
    """Per-language seq-cls results of an untrained TaskAdaptation, validated on both ranks."""
    path = out / "task.tsv"
    if not path.is_file():
        rows = [f"{t}\t{['neg', 'pos'][i % 2]}\t{lang}" for lang in LANGS for i, t in enumerate(TEXT[lang])]
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = LabelledDataModule(train=str(path), val=str(path), backbone=str(backbone), batch_size=4)
    task = TaskAdaptation(backbone=str(backbone), labels=data.labels)
    trainer.validate(task, data, verbose=False)
    return task.results


def main(out: Path) -> None:
    torch.set_num_threads(1)
    backbone = out / "backbone"
    if not (backbone / "config.json").is_file():  # launched ranks find the folder rank 0 wrote
        save_tiny_backbone(backbone)
    files = {lang: str(out / f"{lang}.txt") for lang in TEXT}
    for lang, lines in TEXT.items():
        if not Path(files[lang]).is_file():
            Path(files[lang]).write_text("\n".join(lines * 10) + "\n", encoding="utf-8")
    L.seed_everything(0)
    module = MaskedLMAdaptation(backbone=str(backbone), languages=LANGS, lr=1e-2)
    init = adapter_tensors(module)
    data = MLMDataModule(languages=LANGS, backbone=str(backbone), files=files, batch_size=4, max_length=16)
    trainer = L.Trainer(
        strategy="ddp_find_unused_parameters_true", accelerator="cpu", devices=2, max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[AdapterExport(dirpath=str(out / "adapters"))],
        default_root_dir=str(out),
    )
    trainer.fit(module, data)
    rank = trainer.global_rank
    save_file(adapter_tensors(module), str(out / f"rank{rank}.safetensors"))
    if rank == 0:
        save_file(init, str(out / "init.safetensors"))
    trainer.validate(module, data, verbose=False)
    results = {"mlm": module.results, "task": validate_task(trainer, backbone, out)}
    (out / f"results{rank}.json").write_text(json.dumps(results, sort_keys=True))
    print(f"[ddp_worker] rank {rank} of {trainer.world_size} done at step {trainer.global_step}")


def metrics_modules(out: Path) -> tuple:
    """(translation module, its data, task module, its data), built alike in every process."""
    from xlpeft.data.parallel_datamodule import ParallelDataModule
    from xlpeft.lightning import TranslationAdaptation

    backbone = str(out / "backbone")
    files = {"eng-swh": {s: str(out / "eng-swh.tsv") for s in ("train", "validation", "test")}}
    L.seed_everything(0)
    nmt = TranslationAdaptation(backbone=backbone, languages=["eng", "swh"], decoder_layers=1, max_new_tokens=8)
    nmt_data = ParallelDataModule(directions=["eng-swh"], backbone=backbone, files=files, batch_size=2)
    task_data = LabelledDataModule(train=str(out / "task.tsv"), val=str(out / "task.tsv"), backbone=backbone,
                                   batch_size=2)
    L.seed_everything(0)
    task = TaskAdaptation(backbone=backbone, labels=task_data.labels)
    return nmt.eval(), nmt_data, task, task_data


def validate_metrics(out: Path, devices: int) -> dict:
    """Validation results of both modules on ``devices`` CPU processes (DDP when 2)."""
    nmt, nmt_data, task, task_data = metrics_modules(out)
    trainer = L.Trainer(strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out))
    trainer.validate(nmt, nmt_data, verbose=False)
    trainer.validate(task, task_data, verbose=False)
    return {"rank": trainer.global_rank, "translation": nmt.results, "task": task.results}


if __name__ == "__main__":
    if sys.argv[2:] == ["metrics"]:
        torch.set_num_threads(1)
        found = validate_metrics(Path(sys.argv[1]).resolve(), devices=2)
        (Path(sys.argv[1]) / f"metrics{found['rank']}.json").write_text(json.dumps(found, sort_keys=True))
        print(f"[ddp_worker] metrics rank {found['rank']} done")
    else:
        main(Path(sys.argv[1]).resolve())
