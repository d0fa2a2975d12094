"""``NewScriptEmbeddings``: a new vocabulary for a language the backbone cannot spell.

Pfeiffer et al. 2021, "UNKs Everywhere" (see ``xlpeft.vocab``). At ``setup``:

    target corpus ─► coverage(backbone tokenizer): UNK rate, fertility
        ─► act? (``act="auto"``: UNK rate > ``unk_threshold``; or "always"/"never")
        ─► SentencePiece vocabulary ─► overlap + factorised embeddings (VocabularySwitch)
        ─► the DataModule's tokenizer wrapped (ScriptTokenizer) and its data re-tokenised
    fit: F (+ bias) train with the language's adapters (invertible + bottleneck), backbone frozen

The switch is the AdaptedModel's child ``vocabulary`` (``set_vocabulary_switch``) so its
parameters train and go into adapter-only checkpoints. With ``export_dir`` the
trained vocabulary is written at the end of fit to ``export_dir/<language>-vocabulary``
(``save_vocabulary``), beside ``export_dir/<language>`` where ``AdapterExport(dirpath=export_dir)``
puts the language adapter; ``load_vocabulary`` + ``load_adapter`` bring both back. At ``teardown`` hooks
and the tokenizer are put back unless ``keep=True``; the trained vocabulary
stays in the callback and is re-attached by the next ``setup`` (fit → test).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import lightning as L

from xlpeft.errors import XlpeftValueError
from xlpeft.vocab import Coverage, NewVocabConfig, NewVocabTokenizer, ScriptTokenizer, VocabularySwitch, coverage
from xlpeft.vocab import save_vocabulary, train_vocabulary

ACTS = ("auto", "always", "never")


class NewScriptEmbeddings(L.Callback):
    """Measure, then (maybe) give ``language`` its own vocabulary and embeddings.

    Args:
        language: the new-script language; also the name of its language adapter (routing key).
        corpus: a text file of its training lines, or ``auto`` (Santali for ``sat``, else the registry).
        act: ``auto`` (act when the backbone's UNK rate > ``unk_threshold``), ``always`` or ``never``.
        unk_threshold: UNK rate (share of tokens) above which ``auto`` acts.
        vocab_size, factor_dim, model_type, train_shared, seed: see ``NewVocabConfig``.
        max_lines: read at most this many corpus lines.
        keep: leave hooks, tokenizer and the model's ``vocabulary`` switch in place after the run.
        export_dir: write the trained vocabulary to ``export_dir/<language>-vocabulary`` at the end of fit.
    """

    def __init__(self, language: str, corpus: str = "auto", act: str = "auto", unk_threshold: float = 0.1,
                 vocab_size: int = 4000, factor_dim: int = 64, model_type: str = "unigram",
                 train_shared: bool = False, max_lines: int | None = None, keep: bool = False,
                 seed: int = 0, export_dir: str | None = None) -> None:
        if act not in ACTS:
            raise XlpeftValueError(f"`act` can be {', '.join(ACTS)}; got {act!r}")
        if not 0 <= unk_threshold <= 1:
            raise XlpeftValueError(f"`unk_threshold` must be in [0, 1]; got {unk_threshold}")
        self.language, self.corpus, self.act = language, corpus, act
        self.unk_threshold, self.max_lines, self.keep = unk_threshold, max_lines, keep
        self.export_dir = export_dir
        self.config = NewVocabConfig(vocab_size=vocab_size, factor_dim=factor_dim, model_type=model_type,
                                     train_shared=train_shared, seed=seed)
        self.before: Coverage | None = None
        self.after: Coverage | None = None
        self.acted = False
        self.model: bytes | None = None  # the SentencePiece model, kept for checkpoints
        self.switch: VocabularySwitch | None = None
        self.tokenizer: NewVocabTokenizer | None = None
        self._base: Any = None

    # ----------------------------------------------------------------- corpus
    def texts(self) -> list[str]:
        """Training lines of the target corpus: ``auto`` (registry / Santali) or a text file."""
        if self.corpus != "auto":
            from xlpeft.data.corpora import read_text_file
            lines = read_text_file(self.corpus)
        elif self.language == "sat":
            from xlpeft.data.santali import santali_text
            lines = santali_text("train")
        else:
            from xlpeft.data.corpora import corpus_text
            lines = corpus_text(self.language, split="train")
        lines = [x for x in lines if x.strip()][: self.max_lines or None]
        if not lines:
            raise XlpeftValueError(f"the target corpus of {self.language!r} can be a non-empty text; got no "
                                   f"lines from {self.corpus!r}. Check the corpus path or language")
        return lines

    # ----------------------------------------------------------------- lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        base = getattr(datamodule, "tokenizer", None) or pl_module.adapted.tokenizer
        if isinstance(base, ScriptTokenizer):
            base = base.base
        self._base = base
        if self.switch is None:
            texts = self.texts()
            self.before = coverage(base, texts)
            self.acted = self.act == "always" or (self.act == "auto" and self.before.unk_rate > self.unk_threshold)
            if not self.acted:
                return
            self._build(pl_module, base, texts)
        elif not self.switch.handles:
            self.switch.attach()
        if not self.acted:
            return
        self.switch.vocabs[self.language].requires_grad_(stage == "fit")
        self._retokenise(datamodule, stage)

    def _build(self, pl_module: L.LightningModule, base: Any, texts: list[str]) -> None:
        model = self.model or train_vocabulary(texts, self.config.vocab_size, self.config.model_type,
                                               seed=self.config.seed)
        self.model = model
        self.tokenizer = NewVocabTokenizer(model, base)
        self.switch = VocabularySwitch(pl_module.adapted)
        self.switch.add(self.language, self.tokenizer.shared, self.tokenizer.num_new, self.config,
                        tokenizer=self.tokenizer)
        self.after = coverage(self.tokenizer, texts)
        self._script = ScriptTokenizer(base)
        self._script.add(self.language, self.tokenizer, texts)

    def _retokenise(self, datamodule: Any, stage: str) -> None:
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            return
        datamodule.tokenizer = self._script
        datamodule.setup(stage)  # re-tokenise with the per-language tokenizer

    def export_path(self) -> Path | None:
        """Where ``export_dir`` puts the vocabulary (next to the language adapter's directory)."""
        return None if self.export_dir is None else Path(self.export_dir) / f"{self.language}-vocabulary"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = self.export_path()
        if target is not None and self.acted and trainer.is_global_zero:
            save_vocabulary(self.switch, self.language, target)
            print(f"[xlpeft] new vocabulary of {self.language!r} written to {target}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.acted or self.keep:
            return
        self.switch.detach()
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is self._script:
            datamodule.tokenizer = self._base

    # ----------------------------------------------------------------- report / state
    def report(self) -> dict[str, Any]:
        """What was measured and decided."""
        return {"language": self.language, "acted": self.acted,
                "before": dataclasses.asdict(self.before) if self.before else None,
                "after": dataclasses.asdict(self.after) if self.after else None,
                "new_pieces": self.tokenizer.num_new if self.tokenizer else 0,
                "shared_pieces": len(self.tokenizer.shared) if self.tokenizer else 0}

    def save_model(self, path: str | Path) -> None:
        """Write the SentencePiece model (to tokenise the language elsewhere)."""
        if self.model is None:
            raise XlpeftValueError("no vocabulary was trained; run fit first or set act='always'")
        Path(path).write_bytes(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {**self.report(), "config": dataclasses.asdict(self.config),
                "model": base64.b64encode(self.model).decode() if self.model else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("model")
        if saved is None:
            return
        model = base64.b64decode(saved)
        if self.model is not None and model != self.model:
            raise XlpeftValueError(
                f"the checkpoint's vocabulary for {self.language!r} (sha {hashlib.sha1(model).hexdigest()[:8]}) "
                f"differs from the one built at setup (sha {hashlib.sha1(self.model).hexdigest()[:8]}); "
                "resume with the same corpus, vocab_size and seed")
        self.model = model
        self.acted = bool(state_dict.get("acted", True))
        self.before = Coverage(**state_dict["before"]) if state_dict.get("before") else self.before
        self.after = Coverage(**state_dict["after"]) if state_dict.get("after") else self.after
