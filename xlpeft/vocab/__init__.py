"""New scripts: vocabularies trained on the target corpus, switched per language.

    cov = coverage(tokenizer, texts)                       # UNK rate, fertility
    switch, tok = add_new_vocabulary(adapted, "sat", texts, tokenizer, NewVocabConfig(vocab_size=4000))
    adapted(**tok(["ᱥᱟᱱᱛᱟᱲᱤ …"]), adapters=["sat"])       # "sat" must be an adapter name
    save_vocabulary(switch, "sat", "out/sat-vocab"); load_vocabulary(other, "out/sat-vocab")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xlpeft.vocab.embeddings import NewVocabConfig, NewVocabulary, VocabularySwitch, principal_factors
from xlpeft.vocab.files import load_vocabulary, save_vocabulary
from xlpeft.vocab.tokenizers import Coverage, NewVocabTokenizer, ScriptTokenizer, coverage, train_vocabulary

__all__ = ["Coverage", "NewVocabConfig", "NewVocabTokenizer", "NewVocabulary", "ScriptTokenizer",
           "VocabularySwitch", "add_new_vocabulary", "coverage", "load_vocabulary", "principal_factors",
           "save_vocabulary", "train_vocabulary"]


def add_new_vocabulary(adapted: Any, lang: str, texts: Sequence[str], tokenizer: Any,
                       config: NewVocabConfig | None = None, switch: VocabularySwitch | None = None,
                       model: bytes | None = None) -> tuple[VocabularySwitch, NewVocabTokenizer]:
    """Train (or reuse ``model``) a vocabulary for ``lang`` and attach its embeddings.

    Returns the switch (keep it: it owns the new parameters) and the language's tokenizer.
    """
    config = config or NewVocabConfig()
    model = model if model is not None else train_vocabulary(texts, config.vocab_size, config.model_type,
                                                             seed=config.seed)
    tok = NewVocabTokenizer(model, tokenizer)
    switch = switch or VocabularySwitch.of(adapted) or VocabularySwitch(adapted)
    switch.add(lang, tok.shared, tok.num_new, config, tokenizer=tok)
    return switch, tok
