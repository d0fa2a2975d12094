"""LT-SFT / FishMask training in Lightning (``xlpeft.lightning.sft``) and its YAML configs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_tiny import save_tiny_backbone, tiny_bert_tokenizer, tiny_trainer, write_bible_files
from xlpeft.core.sft import parameters
from xlpeft import AdaptedModel, Stack
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.data.labelled import LabelledDataModule
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.base import mean_pool
from xlpeft.lightning.cli import cli
from xlpeft.lightning.sft import SparseLanguageFineTuning, SparseTaskFineTuning

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = {"count": 300}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("sft") / "tiny-bert"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_bible_files(tmp_path_factory.mktemp("text"), ["eng", "swh"])


def mlm_data(backbone: str, files: dict[str, str], lang: str) -> MLMDataModule:
    return MLMDataModule(languages=[lang], backbone=backbone, files={lang: files[lang]}, batch_size=8, max_length=32)


def theta(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in parameters(module.adapted).items()}


def by_hand_top_k(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], k: int) -> dict[str, list[int]]:
    names = list(before)
    flat = torch.cat([(after[n] - before[n]).abs().reshape(-1) for n in names])
    keep = sorted(torch.argsort(flat, descending=True)[:k].tolist())
    out, start = {}, 0
    for n in names:
        size = before[n].numel()
        mine = [i - start for i in keep if start <= i < start + size]
        if mine:
            out[n] = mine
        start += size
    return out


def test_lt_sft_language_run(backbone, files, tmp_path):
    L.seed_everything(0)
    module = SparseLanguageFineTuning(backbone=backbone, languages=["eng"], support=SUPPORT, phase1_steps=4,
                                      phase2_steps=4, lr=1e-2, weight_decay=0.1, l1=0.1)
    theta0 = theta(module)
    seen: dict[str, dict] = {}
    select = module.select

    def spy():  # the support equals the top-K |Δ| computed here by hand, at the switch
        seen["want"] = by_hand_top_k({n: theta0[n] for n in module.eligible}, theta(module), module.k)
        seen["moved"] = {n for n, p in theta(module).items() if not torch.equal(p, theta0[n])}
        return select()

    module.select = spy
    trainer = tiny_trainer(8, limit_val_batches=0)
    trainer.fit(module, mlm_data(backbone, files, "eng"))
    assert seen["moved"] and seen["moved"] <= set(module.eligible)  # phase 1 moved eligible θ only
    sft = module.adapted.adapter_state_dict("eng")
    got = {k[: -len(".indices")]: v.tolist() for k, v in sft.items() if k.endswith(".indices")}
    assert got == seen["want"] and sum(map(len, got.values())) == 300
    # θ is θ₀ bit for bit after the run (reset, then never written; AdamW decay only on the K values)
    after = theta(module)
    assert all(torch.equal(after[n], theta0[n]) for n in theta0)
    values = [v for k, v in sft.items() if k.endswith(".values")]
    assert any(bool((v != 0).any()) for v in values)
    # phase 2's optimizer holds state for the K values only
    optimizer = trainer.optimizers[0]
    stated = [p for p in optimizer.state]
    assert stated and all(p.numel() for p in stated)
    assert sum(p.numel() for p in stated) == 300
    assert {id(p) for p in stated} == {id(m.values) for m in module.adapted.adapter_modules("eng")}
    module.adapted.save_adapter("eng", str(tmp_path / "eng"))
    fresh = AdaptedModel.from_pretrained(backbone, head="masked-lm")
    assert fresh.load_adapter(str(tmp_path / "eng")) == "eng"


def test_fishmask_language_run_keeps_theta_in_phase_1(backbone, files):
    L.seed_everything(0)
    module = SparseLanguageFineTuning(backbone=backbone, languages=["swh"], support={"density": 0.01},
                                      selection="fishmask", phase1_steps=3, phase2_steps=2, lr=1e-2)
    theta0 = theta(module)
    moved = []
    select = module.select
    module.select = lambda: (moved.append(any(not torch.equal(p, theta0[n]) for n, p in theta(module).items())),
                             select())[1]
    tiny_trainer(5, limit_val_batches=0).fit(module, mlm_data(backbone, files, "swh"))
    assert moved == [False]
    assert module.adapted.configs["swh"].selection == "fishmask"
    eligible = sum(p.numel() for p in module.eligible.values())
    assert module.adapted.configs["swh"].total == round(0.01 * eligible)


def test_bad_sft_run_settings(backbone, files):
    with pytest.raises(XlpeftValueError, match="one language's SFT"):
        SparseLanguageFineTuning(backbone=backbone, languages=["eng", "swh"], support=SUPPORT)
    with pytest.raises(XlpeftValueError, match="larger than the"):
        SparseLanguageFineTuning(backbone=backbone, languages=["eng"], support={"count": 10 ** 9})
    module = SparseLanguageFineTuning(backbone=backbone, languages=["eng"], support=SUPPORT,
                                      phase1_steps=2, phase2_steps=2)
    with pytest.raises(XlpeftValueError, match="phase1_steps \\+ phase2_steps = 4"):
        tiny_trainer(5, limit_val_batches=0).fit(module, mlm_data(backbone, files, "eng"))


@pytest.fixture(scope="module")
def language_sfts(backbone, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lang-sfts")
    model = AdaptedModel.from_pretrained(backbone, head="base")
    gen = torch.Generator().manual_seed(0)
    out = {}
    for lang in ("eng", "swh"):
        params = parameters(model)
        names = [n for n in params if "encoder.layer" in n and n.endswith("weight")][:4]
        idx = {n: torch.randperm(params[n].numel(), generator=gen)[:40] for n in names}
        model.add_sft(lang, idx, {n: torch.randn(40, generator=gen) * 0.3 for n in names})
        model.save_adapter(lang, str(root / lang))
        out[lang] = str(root / lang)
    return out


def labelled(backbone: str, tmp_path: Path) -> LabelledDataModule:
    rows = ['{"text": "the lord said unto them", "label": "pos", "lang": "eng"}',
            '{"text": "thou shall not", "label": "neg", "lang": "eng"}',
            '{"text": "mungu na nchi", "label": "pos", "lang": "swh"}',
            '{"text": "juu ya maji", "label": "neg", "lang": "swh"}']
    (tmp_path / "train.jsonl").write_text("\n".join(rows * 4) + "\n", encoding="utf-8")
    dm = LabelledDataModule(train=str(tmp_path / "train.jsonl"), backbone=backbone, batch_size=8)
    dm.tokenizer = tiny_bert_tokenizer()
    return dm


def test_multi_source_task_sft_groups_by_language(backbone, language_sfts, tmp_path):
    L.seed_everything(0)
    module = SparseTaskFineTuning(backbone=backbone, labels=["neg", "pos"], task_adapter="cls_sft",
                                  language_adapters=language_sfts, train_mode="own", support=SUPPORT,
                                  phase1_steps=3, phase2_steps=3, lr=1e-2, dropout=0.0)
    dm = labelled(backbone, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["langs"]) == {"eng", "swh"}
    module.eval()  # no dropout; eval_mode "own" routes like train_mode "own"
    with torch.no_grad():
        mixed = module(batch)
    for lang in ("eng", "swh"):  # each example under its own language SFT: as if run alone
        rows = [i for i, g in enumerate(batch["langs"]) if g == lang]
        with torch.no_grad():
            out = module.adapted(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                                 adapters=lang)
            alone = module.head(mean_pool(out.last_hidden_state, batch["attention_mask"][rows]))
        torch.testing.assert_close(mixed[rows], alone, rtol=0, atol=1e-6)
    module.train()
    theta0 = theta(module)
    tiny_trainer(6, limit_val_batches=0).fit(module, dm)
    assert module.switched and module.adapted.configs["cls_sft"].total == 300
    assert all(torch.equal(p, theta0[n]) for n, p in theta(module).items())
    module.adapted.set_active(Stack("swh", "cls_sft"))  # zero-shot: θ + φ_task + φ_target
    module.adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("name", ["sft-language.yaml", "sft-task.yaml"])
def test_configs_run_through_xlpeft_fit(name, backbone, files, language_sfts, tmp_path):
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    args = ["fit", "--config", str(ROOT / "configs" / name), f"--model.init_args.backbone={backbone}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.max_steps=4",
            "--model.init_args.phase1_steps=2", "--model.init_args.phase2_steps=2",
            "--model.init_args.support={count: 200}", "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false",
            f"--trainer.callbacks.init_args.dirpath={tmp_path / 'out'}"]
    if "language" in name:
        lang = config["data"]["init_args"]["languages"][0]
        args += [f"--data.init_args.files={{{lang}: {files['eng']}}}"]
    else:
        args += [f"--model.init_args.language_adapters={{eng: {language_sfts['eng']}, swh: {language_sfts['swh']}}}",
                 f"--data.init_args.backbone={backbone}", "--data.init_args.eval_languages=[eng, swh]",
                 "--data.init_args.max_per_genre=2", "--data.init_args.max_eval_per_genre=1",
                 "--data.init_args.batch_size=4"]
    cli(args=args)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written, "no SFT was exported"
    meta = yaml.safe_load((tmp_path / "out" / written[-1] / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "sft"
