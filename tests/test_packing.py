"""Packing and length bucketing (``xlpeft.data.packing``).

Packed rows equal unpacked rows: hidden states of every line and the gradients
of routed, non-identity adapters are the same whether a line runs alone in a
padded batch or packed with other lines of its language under a block mask.
"""

from __future__ import annotations

import pytest
import torch
from tiny import perturb, tiny_model

from xlpeft import AdaptedModel
from xlpeft.data.collators import MLMCollator, pad
from xlpeft.data.packing import (
    LengthBucketSampler, PackedMLMCollator, block_mask, pack_dataset, pack_rows, restart_positions,
    segment_ids,
)
from xlpeft.errors import XlpeftValueError
from xlpeft.methods import BottleneckConfig, LoRAConfig

CLS, SEP, PAD, MASK = 2, 3, 0, 4


def lines(n: int = 9, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        body = torch.randint(5, 120, (int(torch.randint(1, 9, (), generator=gen)),), generator=gen).tolist()
        out.append({"input_ids": [CLS, *body, SEP], "lang": "eng" if i % 3 else "swh",
                    "word_ids": [-1, *range(len(body)), -1]})
    return out


def test_pack_rows_keeps_every_line_once_within_its_language() -> None:
    rows = lines(20)
    packed = pack_rows(rows, max_length=16)
    assert len(packed) < len(rows)
    assert all(len(p["input_ids"]) <= 16 and sum(p["segments"]) == len(p["input_ids"]) for p in packed)
    seen = sorted(tuple(p["input_ids"][s:s + n]) + (p["lang"],) for p in packed
                  for s, n in zip([sum(p["segments"][:k]) for k in range(len(p["segments"]))], p["segments"]))
    assert seen == sorted(tuple(r["input_ids"]) + (r["lang"],) for r in rows)
    assert pack_rows(rows, 16) == packed  # deterministic
    words = [w for w in packed[0]["word_ids"] if w >= 0]
    assert words == sorted(words) and len(set(words)) == len(words)  # distinct words across lines


def test_pack_rows_refuses_bad_input() -> None:
    with pytest.raises(XlpeftValueError, match="line 0 has 9"):
        pack_rows([{"input_ids": list(range(9)), "lang": "eng"}], max_length=8)
    with pytest.raises(XlpeftValueError, match="`max_length` can be a positive integer"):
        pack_rows([], max_length=0)


def test_block_mask_and_positions() -> None:
    seg = segment_ids([[2, 3], [4]], width=5)
    assert seg.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, -1]]
    mask = block_mask(seg)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0, 0].tolist() == [True, True, False, False, False]
    assert not mask[1, 0, 4].any() and not mask[1, 0, :, 4].any()
    additive = block_mask(seg, torch.float32)
    assert additive[0, 0, 0, 2] == torch.finfo(torch.float32).min and additive[0, 0, 0, 1] == 0
    assert restart_positions([[2, 3], [4]], 5).tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 0]]
    assert restart_positions([[2]], 3, offset=2).tolist() == [[2, 3, 2]]  # XLM-R: from padding_idx + 1


def routed_model(family: str = "bert") -> AdaptedModel:
    am = AdaptedModel(tiny_model(family, "base"))
    am.add_adapter("eng", BottleneckConfig(reduction_factor=4, placement=("attn", "ffn")))
    am.add_adapter("swh", LoRAConfig(r=2, targets=("q", "v")))
    for i, name in enumerate(("eng", "swh")):
        perturb(am, name, seed=i)
    am.train_adapters("eng", "swh")
    return am.eval()


def hidden_and_grads(am: AdaptedModel, batch: dict, langs: list[str], real: torch.Tensor) -> tuple:
    am.zero_grad(set_to_none=True)
    out = am(**batch, adapters=langs).last_hidden_state
    (out[real] ** 2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in am.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, mask_dtype", [("bert", None), ("bert", torch.float32), ("xlm-roberta", None)],
                         ids=["bert-bool", "bert-additive", "xlm-roberta-bool"])
def test_packed_rows_equal_unpacked_rows(family: str, mask_dtype) -> None:
    am = routed_model(family)
    pad_id = am.model.config.pad_token_id
    offset = pad_id + 1 if family == "xlm-roberta" else 0  # XLM-R counts positions from padding_idx + 1
    rows = lines(9)
    ids = pad([r["input_ids"] for r in rows], pad_id)
    lengths = [len(r["input_ids"]) for r in rows]
    attention = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    alone, grads = hidden_and_grads(am, {"input_ids": ids, "attention_mask": attention},
                                    [r["lang"] for r in rows], attention.bool())
    packed = pack_rows(rows, max_length=20)
    assert len(packed) < len(rows)
    pids = pad([p["input_ids"] for p in packed], pad_id, 8)
    seg = segment_ids([p["segments"] for p in packed], pids.shape[1])
    batch = {"input_ids": pids, "attention_mask": block_mask(seg, mask_dtype),
             "position_ids": restart_positions([p["segments"] for p in packed], pids.shape[1], offset)}
    together, packed_grads = hidden_and_grads(am, batch, [p["lang"] for p in packed], seg >= 0)
    by_line = {}
    for b, p in enumerate(packed):
        start = 0
        for n in p["segments"]:
            by_line.setdefault(tuple(p["input_ids"][start:start + n]), []).append(together[b, start:start + n])
            start += n
    for i, r in enumerate(rows):
        torch.testing.assert_close(by_line[tuple(r["input_ids"])].pop(), alone[i, :lengths[i]],
                                   rtol=1e-5, atol=1e-5)
    assert grads.keys() == packed_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5)


def test_packed_collator_masks_within_lines_and_leaves_plain_rows_alone() -> None:
    args = dict(mask_id=MASK, pad_id=PAD, vocab_size=128, special_ids=(PAD, CLS, SEP, MASK), seed=3)
    collate = PackedMLMCollator(**args)
    packed = pack_rows(lines(12), max_length=24)
    batch = collate(packed[:3])
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"].shape == (3, 1, width, width)
    assert batch["position_ids"].shape == (3, width) and batch["langs"] == [p["lang"] for p in packed[:3]]
    seg = segment_ids([p["segments"] for p in packed[:3]], width)
    chosen = batch["labels"] != -100
    assert (seg[chosen] >= 0).all() and chosen.any(1).all()
    originals = pad([p["input_ids"] for p in packed[:3]], PAD, 8)
    assert not torch.isin(originals[chosen], torch.tensor([CLS, SEP])).any()
    plain = lines(4)
    torch.testing.assert_close(collate(plain)["input_ids"], MLMCollator(**args)(plain)["input_ids"])
    whole = PackedMLMCollator(**args, whole_word=True)(packed[:2])  # word ids offset per line
    assert whole["labels"].shape == whole["input_ids"].shape


def test_pack_dataset_keeps_the_kind() -> None:
    from datasets import Dataset
    rows = lines(6)
    data = Dataset.from_list([{k: r[k] for k in ("input_ids", "lang")} for r in rows])
    packed = pack_dataset(data, 16)
    assert isinstance(packed, Dataset) and packed[0]["segments"] == pack_rows(rows, 16)[0]["segments"]
    assert pack_dataset(rows, 16) == pack_rows(rows, 16)


def test_length_buckets_cover_every_example_once_and_pad_less() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (400,), generator=gen).tolist()
    sampler = LengthBucketSampler(lengths, batch_size=16, window=10, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(400)) and len(batches) == len(sampler)
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches

    def pad_share(groups: list[list[int]]) -> float:
        return 1 - sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in groups)
    plain = [list(range(i, min(i + 16, 400))) for i in range(0, 400, 16)]
    assert pad_share(batches) < pad_share(plain) / 3
    with pytest.raises(XlpeftValueError, match="`batch_size` can be a positive integer"):
        LengthBucketSampler(lengths, batch_size=0)


def test_packed_collator_follows_the_backbones_position_convention(tmp_path) -> None:
    from xlpeft.data.packing import packed_collator, position_offset
    args = dict(mask_id=MASK, pad_id=1, vocab_size=128, special_ids=(1, CLS, SEP, MASK))
    for family, offset in (("bert", 0), ("xlm-roberta", 2)):
        tiny_model(family).config.save_pretrained(tmp_path / family)
        collate = packed_collator(MLMCollator(**args), str(tmp_path / family))
        assert isinstance(collate, PackedMLMCollator) and collate.position_offset == offset
    assert position_offset("bert", 0) == 0 and position_offset("xlm-roberta", 1) == 2


def test_mlm_datamodule_packing_gives_the_unpacked_loss(tmp_path) -> None:
    """Opt-in packing end to end: fewer rows, 4-D masks, and MaskedLMAdaptation's loss of a packed
    batch equals the loss of the same (corrupted) lines in an ordinary padded batch."""
    import torch.nn.functional as F
    from lightning_tiny import WORDS, save_tiny_backbone

    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning import MaskedLMAdaptation
    backbone = str(save_tiny_backbone(tmp_path / "tiny-bert"))
    files = {}
    for k, lang in enumerate(("eng", "swh")):  # short lines of known words, as verses are to max_length
        text = [" ".join(WORDS[(i * 7 + j + k) % len(WORDS)] for j in range(2 + i % 9)) for i in range(60)]
        (tmp_path / f"{lang}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
        files[lang] = str(tmp_path / f"{lang}.txt")
    kwargs = dict(languages=["eng", "swh"], backbone=backbone, files=files, batch_size=4, max_length=64)
    plain, packed = MLMDataModule(**kwargs), MLMDataModule(**kwargs, packing=True)
    for dm in (plain, packed):
        dm.setup("fit")
    assert len(packed.train_set) < len(plain.train_set) and "segments" in packed.train_set.column_names
    batch = next(iter(packed.train_dataloader()))
    assert batch["attention_mask"].dim() == 4 and "position_ids" in batch
    assert next(iter(packed.val_dataloader()))["attention_mask"].dim() == 2  # evaluation stays unpacked
    rows, labels, langs = [], [], []
    for b, lang in enumerate(batch["langs"]):
        start = 0
        for n in _segments(batch, b):
            rows.append(batch["input_ids"][b, start:start + n].tolist())
            labels.append(batch["labels"][b, start:start + n].tolist())
            langs.append(lang)
            start += n
    pad_id = packed.tokenizer.pad_token_id
    unpacked = {"input_ids": pad(rows, pad_id), "labels": pad(labels, -100), "langs": langs}
    unpacked["attention_mask"] = pad([[1] * len(r) for r in rows], 0)
    module = MaskedLMAdaptation(backbone=backbone, languages=["eng", "swh"]).eval()
    losses = []
    with torch.no_grad():
        for b in (batch, unpacked):
            logits, targets, _ = module.masked_logits(b)
            losses.append(F.cross_entropy(logits, targets))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(XlpeftValueError, match="`packing` can be true or false"):
        MLMDataModule(**kwargs, packing="yes")


def _segments(batch: dict, b: int) -> list[int]:
    """Line lengths of packed row ``b``, read back from its restarting position ids."""
    pos = batch["position_ids"][b].tolist()
    real = int((batch["attention_mask"][b, 0].any(-1)).sum())
    starts = [i for i in range(real) if pos[i] == pos[0]] + [real]
    return [e - s for s, e in zip(starts, starts[1:])]
