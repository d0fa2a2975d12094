"""MLM masking statistics and classification padding (xlpeft/data/collators.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_tiny import tiny_bert_tokenizer
from xlpeft.data.collators import IGNORE, ClassificationCollator, MLMCollator
from xlpeft.errors import XlpeftValueError

SPECIAL = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK, PAD, VOCAB = 4, 0, 128


def random_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """[CLS] random tokens [SEP] rows of varying length (padding in the batch)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 10 + int(torch.randint(50, (), generator=gen))
        body = torch.randint(5, VOCAB, (length,), generator=gen).tolist()
        rows.append({"input_ids": [2, *body, 3], "lang": "eng" if i % 2 else "swh"})
    return rows


def collator(**kwargs) -> MLMCollator:
    options = dict(mask_id=MASK, pad_id=PAD, vocab_size=VOCAB, special_ids=SPECIAL,
                   generator=torch.Generator().manual_seed(1))
    return MLMCollator(**{**options, **kwargs})


def test_mlm_masking_rates_and_labels():
    rows = random_rows()
    batch = collator()(rows)
    original = torch.full_like(batch["input_ids"], PAD)
    for i, r in enumerate(rows):
        original[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    labels, inputs = batch["labels"], batch["input_ids"]
    target = labels != IGNORE
    special = torch.isin(original, torch.tensor(SPECIAL))
    assert batch["langs"] == [r["lang"] for r in rows]
    assert batch["input_ids"].shape[1] % 8 == 0
    assert not (target & special).any(), "special tokens and padding are never targets"
    assert torch.equal(labels[target], original[target])
    rate = target.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = target.sum().item()
    masked = (inputs[target] == MASK).sum().item() / n
    kept = (inputs[target] == original[target]).sum().item() / n
    assert abs(masked - 0.8) < 0.03, masked
    # 10% kept plus the random draws that hit the original token (1/128 of the other 10%)
    assert abs(kept - 0.1) < 0.03, kept
    assert abs((1 - masked - kept) - 0.1) < 0.03
    assert torch.equal(inputs[~target], original[~target]), "non-targets are never corrupted"
    assert torch.equal(batch["attention_mask"], (original != PAD).long())


def test_every_row_has_a_target_even_at_low_probability():
    rows = [{"input_ids": [2, 7, 8, 3], "lang": "eng"} for _ in range(50)]
    batch = collator(probability=0.01)(rows)
    assert ((batch["labels"] != IGNORE).sum(1) >= 1).all()
    assert (batch["labels"][:, [0, 3]] == IGNORE).all()


def test_a_pad_id_inside_a_row_stays_attended():
    batch = collator()([{"input_ids": [2, 0, 9, 3], "lang": "eng"}, {"input_ids": [2, 9, 3], "lang": "eng"}])
    assert batch["attention_mask"][0, :4].tolist() == [1, 1, 1, 1]
    assert batch["attention_mask"][1, :4].tolist() == [1, 1, 1, 0]


def _word_rows(probability_rows: int = 60) -> list[dict]:
    tok = tiny_bert_tokenizer()
    texts = ["hapo mwanzo mungu aliziumba mbingu na nchi", "in the beginning god created the heaven",
             "nayo nchi ilikuwa ukiwa tena utupu", "and the spirit of god moved"]
    rows = []
    for i in range(probability_rows):
        enc = tok(texts[i % len(texts)])
        words = [-1 if w is None else w for w in enc.word_ids()]
        rows.append({"input_ids": enc["input_ids"], "word_ids": words, "lang": "swh"})
    return rows


@pytest.mark.parametrize("probability", [0.15, 0.01])
def test_whole_word_masks_every_piece_of_a_chosen_word(probability):
    rows = _word_rows()
    batch = collator(whole_word=True, probability=probability, special_ids=(0, 1, 2, 3, 4))(rows)
    target = batch["labels"] != IGNORE
    for i, r in enumerate(rows):
        words = r["word_ids"]
        assert target[i].any()
        for w in set(words) - {-1}:
            picked = {bool(target[i, j]) for j, x in enumerate(words) if x == w}
            assert len(picked) == 1, f"row {i}: word {w} partly masked"
        assert not target[i, [j for j, x in enumerate(words) if x == -1]].any()
    multi_piece = [w for w in set(rows[0]["word_ids"]) if rows[0]["word_ids"].count(w) > 1]
    assert multi_piece, "the test text must have words of several pieces"


def test_seeded_collator_gives_the_same_masks_for_the_same_batch():
    rows = random_rows(20)
    fixed = collator(generator=None, seed=5)
    first, second = fixed(rows), fixed(rows)
    assert torch.equal(first["labels"], second["labels"])
    assert torch.equal(first["input_ids"], second["input_ids"])
    free = collator()
    assert not torch.equal(free(rows)["labels"], free(rows)["labels"])


def test_mlm_collator_errors():
    with pytest.raises(XlpeftValueError, match=r"`probability` must be in \(0, 1\); got 1.5"):
        collator(probability=1.5)
    with pytest.raises(XlpeftValueError, match="whole_word masking needs `word_ids`"):
        collator(whole_word=True)([{"input_ids": [2, 5, 3], "lang": "eng"}])


def test_classification_collator_sequence_and_token_labels():
    coll = ClassificationCollator(pad_id=PAD)
    seq = coll([{"input_ids": [2, 5, 3], "label": 1, "lang": "eng"},
                {"input_ids": [2, 5, 6, 7, 3], "label": 0, "lang": "swh"}])
    assert seq["labels"].tolist() == [1, 0] and seq["langs"] == ["eng", "swh"]
    assert seq["attention_mask"].sum(1).tolist() == [3, 5]
    tok = coll([{"input_ids": [2, 5, 3], "label": [IGNORE, 1, IGNORE], "lang": "eng"},
                {"input_ids": [2, 5, 6, 3], "label": [IGNORE, 0, 2, IGNORE], "lang": "eng"}])
    assert tok["labels"].shape == tok["input_ids"].shape
    assert tok["labels"][0].tolist()[:4] == [IGNORE, 1, IGNORE, IGNORE]
    assert (tok["labels"][:, 4:] == IGNORE).all()


def test_new_vocabulary_rows_draw_random_replacements_from_their_own_ids():
    pool = list(range(VOCAB, VOCAB + 40))  # a new vocabulary's ids (≥ the backbone's size) …
    rows = random_rows()
    for r in rows[::2]:  # … written by the "swh" rows
        r["input_ids"] = [2, *[pool[i % 40] for i in r["input_ids"][1:-1]], 3]
    plain = collator()(rows)
    own = collator(language_ids={"swh": pool + [1]})(rows)  # [UNK] (special) is never drawn
    eng = torch.tensor([r["lang"] == "eng" for r in rows])
    assert torch.equal(own["input_ids"][eng], plain["input_ids"][eng]), "other rows keep the old draws"
    for batch, inside in ((own, True), (plain, False)):
        target = batch["labels"] != IGNORE
        swapped = target & (batch["input_ids"] != MASK) & (batch["input_ids"] != batch["labels"])
        drawn = batch["input_ids"][swapped & ~eng[:, None]]
        assert len(drawn) > 50
        assert torch.isin(drawn, torch.tensor(pool)).all().item() is inside
    with pytest.raises(XlpeftValueError, match="`language_ids` can map a language to non-special ids; got none for swh"):
        collator(language_ids={"swh": [0, 1]})
