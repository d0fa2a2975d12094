"""DDP worker for ``test_resume.py``: 2 CPU ranks (gloo) train, are killed, resume.

    python tests/ddp_resume_worker.py OUTDIR full          # 8 steps; rank 0 writes OUTDIR/full.safetensors
    python tests/ddp_resume_worker.py OUTDIR kill K        # checkpoint at step K, then die
    python tests/ddp_resume_worker.py OUTDIR resume K      # resume from it to 8; writes OUTDIR/resumed.safetensors

Each rank holds 18 of the 36 training lines: 5 batches an epoch, so 8 steps
cross an epoch boundary. Ranks pad their batches differently, so their
dropout RNGs differ: the checkpoint keeps every rank's.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_tiny import KillAt, save_tiny_backbone  # noqa: E402
from xlpeft.data.datamodules import MLMDataModule  # noqa: E402
from xlpeft.lightning import MaskedLMAdaptation  # noqa: E402

LANGS = ["eng", "swh"]
TEXT = {"eng": ["the lord said unto them", "and he shall be with him", "thou shall not", "in the beginning"],
        "swh": ["hapo mwanzo mungu", "na nchi ya maji", "juu ya uso wa maji", "mungu katika nchi"]}
STEPS = 8


def main(out: Path, mode: str, step: int) -> None:
    backbone = out / "backbone"
    if not backbone.is_dir():  # the launcher (rank 0) builds it before Lightning starts rank 1
        save_tiny_backbone(backbone)
        for lang, lines in TEXT.items():
            (out / f"{lang}.txt").write_text("\n".join(lines * 5) + "\n", encoding="utf-8")
    L.seed_everything(0 if mode != "resume" else 123)
    random.seed(99)
    module = MaskedLMAdaptation(backbone=str(backbone), languages=LANGS, lr=1e-2, warmup_steps=2)
    data = MLMDataModule(languages=LANGS, backbone=str(backbone), batch_size=4, max_length=16, seed=3,
                         files={lang: str(out / f"{lang}.txt") for lang in LANGS})
    callbacks: list[L.Callback] = []
    if mode == "kill":
        callbacks = [ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=step, filename="killed"),
                     KillAt(step, SystemExit)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
                        max_steps=STEPS, logger=False, enable_checkpointing=mode == "kill", callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(out))
    trainer.fit(module, data, ckpt_path=str(out / "ckpt" / "killed.ckpt") if mode == "resume" else None)
    if trainer.is_global_zero:
        tensors = {f"{lang}/{k}": v.detach().clone().contiguous()
                   for lang in LANGS for k, v in module.adapted.adapter_state_dict(lang).items()}
        save_file(tensors, str(out / f"{'full' if mode == 'full' else 'resumed'}.safetensors"))
    print(f"rank {trainer.global_rank} {mode} done at step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
