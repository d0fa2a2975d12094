"""Held-out masked-LM scores of any text under any adapter setup (no Trainer needed).

The masks depend only on each batch's token ids and ``seed`` (``MLMCollator``'s
content seeding), so two setups — no adapter, the English one, the language's
own, an ``Average`` — are scored on exactly the same masked positions and their
difference is paired, the same way :mod:`xlpeft.lightning.transfer` pairs task
predictions.

    from xlpeft.lightning.scoring import mlm_scores
    mlm_scores(model, swahili_lines, setup=None)     # the backbone alone
    mlm_scores(model, swahili_lines, setup="swh")    # under the swh language adapter
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from xlpeft.core.composition import Setup, leaves
from xlpeft.errors import XlpeftValueError

__all__ = ["mlm_scores"]


@torch.no_grad()
def mlm_scores(model: Any, texts: Sequence[str], setup: Setup | None = None, *, max_length: int = 64,
               batch_size: int = 16, seed: int = 0, probability: float = 0.15) -> dict[str, float]:
    """Masked-token loss (nats), accuracy, perplexity and the masked-token count of ``texts``.

    ``model`` is an :class:`~xlpeft.AdaptedModel` with a masked-LM head (``head="masked-lm"``)
    and a tokenizer; ``setup`` is any setup it can run (a name, ``Stack``, ``Average`` …) or
    None for the backbone without adapters.
    """
    from xlpeft.data.collators import MLMCollator

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise XlpeftValueError("`texts` can be a list of non-empty lines; got none")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or tokenizer.mask_token_id is None:
        raise XlpeftValueError("mlm_scores needs an AdaptedModel with a masked-LM tokenizer (mask token); "
                               "load it with AdaptedModel.from_pretrained(name, head='masked-lm')")
    if setup is not None:
        model.require_adapters(*leaves(setup))
    collate = MLMCollator(mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id or 0,
                          vocab_size=len(tokenizer), special_ids=tuple(tokenizer.all_special_ids),
                          probability=probability, seed=seed)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            enc = tokenizer(chunk, truncation=True, max_length=max_length)
            batch = collate([{"input_ids": ids, "lang": ""} for ids in enc["input_ids"]])
            if setup is None:
                with model.disable_adapters():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               adapters=[setup] * len(chunk)).logits
            mask = batch["labels"] != -100
            picked, gold = logits[mask].float(), batch["labels"][mask]
            loss_sum += float(F.cross_entropy(picked, gold, reduction="sum"))
            correct += int((picked.argmax(-1) == gold).sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    loss = loss_sum / count
    return {"loss": loss, "accuracy": correct / count, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}

