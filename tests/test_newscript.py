"""New-script vocabularies: overlap + factorised init, per-language switching, the callback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_tiny import save_tiny_backbone, tiny_bert_tokenizer, tiny_trainer
from tiny import perturb, tiny_model
from xlpeft import AdaptedModel
from xlpeft.data.collators import pad
from xlpeft.data.transliterate import transliterate
from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftKeyError, XlpeftValueError
from xlpeft.vocab import NewVocabConfig, ScriptTokenizer, VocabularySwitch, add_new_vocabulary, coverage
from xlpeft.vocab import load_vocabulary, save_vocabulary, train_vocabulary

LATIN = ["the lord said unto them and he shall be with him", "and they be not in the land of the lord",
         "hello world the book is read", "mungu na nchi juu ya maji katika hapo"] * 20
SCRIPT = [transliterate(t) for t in LATIN]
CONFIG = NewVocabConfig(vocab_size=30, factor_dim=8)


def fresh_model() -> AdaptedModel:
    """The seeded tiny BERT with perturbed ``eng`` and ``sat`` language adapters (same every call)."""
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("eng", "madx-language")
    am.add_adapter("sat", "madx-language")
    perturb(am, "eng", seed=1)
    perturb(am, "sat", seed=2)
    return am


@pytest.fixture()
def model() -> tuple[AdaptedModel, object]:
    return fresh_model(), tiny_bert_tokenizer()


def encode(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    ids = pad(tok(texts, truncation=True, max_length=16)["input_ids"], 0)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_the_backbone_tokenizer_cannot_spell_the_new_script():
    tok = tiny_bert_tokenizer()
    assert coverage(tok, LATIN).unk_rate == 0
    cov = coverage(tok, SCRIPT)
    assert cov.unk_word_rate == 1.0 and cov.unk_rate > 0.5


def test_shared_pieces_keep_their_original_embeddings(model):
    am, tok = model
    config = NewVocabConfig(vocab_size=40, factor_dim=8, train_shared=True)
    mixed = SCRIPT + ["the lord said unto them"] * 40  # some pieces exist in the old vocabulary
    switch, new = add_new_vocabulary(am, "sat", mixed, tok, config)
    vocab = switch.vocabs["sat"]
    old = am.model.get_input_embeddings().weight
    assert len(new.shared) > 2
    torch.testing.assert_close(vocab.shared_rows, old[vocab.shared_ids], rtol=0, atol=0)
    ids = torch.tensor([sorted(new.shared.values())])
    torch.testing.assert_close(vocab.embed(ids, torch.zeros(1, ids.shape[1], old.shape[1])), old[ids])


def test_new_pieces_are_factorised_from_principal_components(model):
    am, tok = model
    switch, new = add_new_vocabulary(am, "sat", SCRIPT, tok, CONFIG)
    vocab = switch.vocabs["sat"]
    g = vocab.G
    torch.testing.assert_close(g @ g.T, torch.eye(g.shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(vocab.weight(), vocab.mean + vocab.F @ g)
    trainable = {n for n, p in vocab.named_parameters() if p.requires_grad}
    assert trainable == {"F", "bias"} and vocab.F.shape == (new.num_new, 8)


def test_other_languages_are_unchanged_by_a_new_script(model):
    am, tok = model
    batch = encode(tok, LATIN[:3])
    with torch.no_grad():
        before = am(**batch, adapters=["eng"] * 3).logits
        switch, new = add_new_vocabulary(am, "sat", SCRIPT, tok, CONFIG)
        after = am(**batch, adapters=["eng"] * 3).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    switch.detach()


def test_mixed_batch_routes_each_row_to_its_vocabulary(model):
    am, tok = model
    switch, new = add_new_vocabulary(am, "sat", SCRIPT, tok, CONFIG)
    script = ScriptTokenizer(tok)
    script.add("sat", new, SCRIPT)
    texts = [LATIN[0], SCRIPT[1], LATIN[2], SCRIPT[3]]
    batch = encode(script, texts)
    assert int(batch["input_ids"][1].max()) >= 128 and int(batch["input_ids"][0].max()) < 128
    with torch.no_grad():
        mixed = am(**batch, adapters=["eng", "sat", "eng", "sat"]).logits
        eng = am(**encode(tok, [LATIN[0], LATIN[2]]), adapters=["eng", "eng"]).logits
        sat = am(**encode(script, [SCRIPT[1], SCRIPT[3]]), adapters=["sat", "sat"]).logits
    vocab = switch.vocabs["sat"]
    assert mixed.shape[-1] == 128 + new.num_new == sat.shape[-1]
    width = eng.shape[1]
    torch.testing.assert_close(mixed[[0, 2], :width, :128], eng, atol=1e-5, rtol=1e-5)
    assert torch.isinf(mixed[[0, 2], :, 128:]).all()
    torch.testing.assert_close(mixed[[1, 3], : sat.shape[1]], sat, atol=1e-5, rtol=1e-5)
    assert torch.isinf(mixed[1, :, :128][:, ~vocab.keep_old]).all()


def test_gradients_reach_only_the_routed_vocabulary(model):
    am, tok = model
    switch, new = add_new_vocabulary(am, "sat", SCRIPT, tok, CONFIG)
    add_new_vocabulary(am, "eng", LATIN, tok, CONFIG, switch=switch)
    am.train_adapters("sat")
    switch.requires_grad_(True)
    script = ScriptTokenizer(tok)
    script.add("sat", new, SCRIPT)
    logits = am(**encode(script, SCRIPT[:2]), adapters=["sat", "sat"]).logits
    logits[torch.isfinite(logits)].sum().backward()
    assert switch.vocabs["sat"].F.grad is not None and switch.vocabs["sat"].F.grad.abs().sum() > 0
    assert switch.vocabs["eng"].F.grad is None


def test_new_ids_without_routing_are_refused(model):
    am, tok = model
    switch, new = add_new_vocabulary(am, "sat", SCRIPT, tok, CONFIG)
    ids = torch.tensor([[2, 130, 3]])
    with pytest.raises(XlpeftValueError, match="outside the backbone vocabulary.*route those examples"):
        am(input_ids=ids, adapters=["eng"])


def test_invertible_adapter_inverts_exactly(model):
    am, _ = model
    coupling = am.shared["sat"]["invertible"]
    x = torch.randn(3, 5, am.backbone.hidden)
    y = coupling(x)
    assert not torch.allclose(y, x)  # perturbed: not the identity
    torch.testing.assert_close(coupling.inverse(y), x, atol=1e-5, rtol=1e-5)


def test_empty_corpus_is_refused():
    with pytest.raises(XlpeftValueError, match="`texts` can be a non-empty"):
        train_vocabulary(["", "  "], 50)
    with pytest.raises(XlpeftValueError, match="`texts` can be a non-empty"):
        coverage(tiny_bert_tokenizer(), [])


def test_too_small_corpus_names_the_maximum():
    with pytest.raises(XlpeftValueError, match=r"`vocab_size` can be at most .*≤ \d+.*got 5000"):
        train_vocabulary(SCRIPT[:3], 5000)


def test_vocabulary_training_is_deterministic():
    assert train_vocabulary(SCRIPT, 30) == train_vocabulary(SCRIPT, 30)


# ---------------------------------------------------------------------- vocabulary directories
def _trained(am: AdaptedModel, tok) -> tuple[VocabularySwitch, object]:
    """``sat``'s vocabulary with trained-looking (non-initial) F, bias and shared rows."""
    config = NewVocabConfig(vocab_size=40, factor_dim=8, train_shared=True)
    switch, new = add_new_vocabulary(am, "sat", SCRIPT + ["the lord said unto them"] * 40, tok, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in switch.vocabs["sat"].parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return switch, new


def _outputs(am: AdaptedModel, tok, new) -> tuple[torch.Tensor, torch.Tensor]:
    script = ScriptTokenizer(tok)
    script.add("sat", new, SCRIPT)
    batch = encode(script, [SCRIPT[0], "the lord said unto them", SCRIPT[3]])
    with torch.no_grad():
        out = am(**batch, adapters=["sat"] * 3, output_hidden_states=True)
    return out.logits, out.hidden_states[0]


def _plain(am: AdaptedModel, tok) -> torch.Tensor:
    """Logits of backbone-tokenised text (script text → [UNK]) routed to ``sat``."""
    with torch.no_grad():
        return am(**encode(tok, [LATIN[0], SCRIPT[0]]), adapters=["sat", "sat"]).logits


def test_saved_vocabulary_loads_into_a_fresh_model_with_identical_outputs(model, tmp_path):
    am, tok = model
    switch, new = _trained(am, tok)
    logits, embedded = _outputs(am, tok, new)
    path = save_vocabulary(am, "sat", tmp_path / "sat-vocabulary")  # the model finds its switch
    assert sorted(p.name for p in path.iterdir()) == ["sentencepiece.model", "vocabulary.safetensors",
                                                      "vocabulary_config.json"]
    assert not list(tmp_path.glob(".*")), "no temp directories are left behind"
    other = fresh_model()
    loaded, tok2 = load_vocabulary(other, path, tokenizer=tok)
    assert loaded is VocabularySwitch.of(other) and tok2.to_id == new.to_id and tok2.model == new.model
    again_logits, again_embedded = _outputs(other, tok, tok2)
    initial = loaded.build(new.shared, new.num_new, switch.vocabs["sat"].config)
    assert not torch.equal(initial.F, loaded.vocabs["sat"].F)  # the trained F arrived, not a fresh init
    torch.testing.assert_close(again_logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(again_embedded, embedded, rtol=0, atol=0)
    with pytest.raises(XlpeftValueError, match="'sat' already has a new vocabulary"):
        load_vocabulary(loaded, path, tokenizer=tok)


def _damage(path, how: str) -> None:
    if how == "truncated weights":
        file = path / "vocabulary.safetensors"
        file.write_bytes(file.read_bytes()[:100])
    elif how == "missing sentencepiece model":
        (path / "sentencepiece.model").unlink()
    elif how == "damaged sentencepiece model":
        (path / "sentencepiece.model").write_bytes(b"not a model")
    elif how == "another hidden size":
        import json
        meta = json.loads((path / "vocabulary_config.json").read_text())
        meta["backbone"]["hidden_size"] = 48
        (path / "vocabulary_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("how", "error", "match"), [
    ("truncated weights", CorruptFileError, "vocabulary.safetensors is truncated or corrupted"),
    ("missing sentencepiece model", XlpeftValueError, "has no sentencepiece.model; the vocabulary directory is "
                                                      "incomplete"),
    ("damaged sentencepiece model", CorruptFileError, "does not match the sha1"),
    ("another hidden size", IncompatibleAdapterError, r"another backbone \(hidden_size: file 48 vs model 32\)"),
])
def test_a_failed_vocabulary_load_leaves_the_model_unchanged(model, tmp_path, how, error, match):
    am, tok = model
    _, new = _trained(am, tok)
    path = save_vocabulary(am, "sat", tmp_path / "sat-vocabulary")
    _damage(path, how)
    other = fresh_model()
    before = _plain(other, tok)
    hooks = len(other.model.get_input_embeddings()._forward_hooks)
    with pytest.raises(error, match=match):
        load_vocabulary(other, path, tokenizer=tok)
    assert VocabularySwitch.of(other) is None and len(other.model.get_input_embeddings()._forward_hooks) == hooks
    torch.testing.assert_close(_plain(other, tok), before, rtol=0, atol=0)


def test_a_vocabulary_for_another_width_names_the_difference(model, tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    am, tok = model
    _trained(am, tok)
    path = save_vocabulary(am, "sat", tmp_path / "sat-vocabulary")
    wide = AdaptedModel(BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64)))
    with pytest.raises(IncompatibleAdapterError, match="hidden_size: file 32 vs model 48"):
        load_vocabulary(wide, path, tokenizer=tok)
    assert VocabularySwitch.of(wide) is None
    with pytest.raises(XlpeftKeyError, match=r"unknown new vocabulary .swh.; known: sat \(add it with add_new_vocabulary"):
        save_vocabulary(am, "swh", tmp_path / "swh")


def test_datamodule_tokenisation_selects_by_the_example_language(model):
    from xlpeft.data.datamodules import tokenize
    am, tok = model
    _, new = add_new_vocabulary(am, "sat", SCRIPT, tok, CONFIG)
    script = ScriptTokenizer(tok)
    script.add("sat", new, SCRIPT)
    texts, langs = [SCRIPT[0], SCRIPT[0], LATIN[1]], ["sat", "eng", "eng"]
    rows = tokenize(script, texts, langs, max_length=16)["input_ids"]
    assert max(rows[0]) >= 128  # its own vocabulary …
    assert rows[1] == tok(SCRIPT[0], truncation=True, max_length=16)["input_ids"]  # … the backbone's, as asked
    assert rows[2] == tok(LATIN[1], truncation=True, max_length=16)["input_ids"]
    assert rows[1] != script([SCRIPT[0]], truncation=True, max_length=16)["input_ids"][0]  # detection says sat


# ---------------------------------------------------------------------- the callback
@pytest.fixture(scope="module")
def lit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("newscript")
    (root / "sat.txt").write_text("\n".join(SCRIPT) + "\n", encoding="utf-8")
    (root / "empty.txt").write_text("\n\n", encoding="utf-8")
    (root / "eng.txt").write_text("\n".join(LATIN) + "\n", encoding="utf-8")
    return {"backbone": str(save_tiny_backbone(root / "bb")), "sat": str(root / "sat.txt"),
            "eng": str(root / "eng.txt"),
            "empty": str(root / "empty.txt")}


def _fit(lit: dict[str, str], callback, steps: int = 2):
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    module = MaskedLMAdaptation(backbone=lit["backbone"], languages=["eng", "sat"], lr=1e-2)
    data = MLMDataModule(languages=["eng", "sat"], backbone=lit["backbone"],
                         files={"sat": lit["sat"], "eng": lit["eng"]}, batch_size=8, max_eval_lines=8)
    trainer = tiny_trainer(steps, callbacks=[callback])
    trainer.fit(module, data)
    return module, data, trainer


def test_callback_trains_the_new_vocabulary_and_puts_everything_back(lit, tmp_path):
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    from xlpeft.lightning.newscript import NewScriptEmbeddings
    cb = NewScriptEmbeddings("sat", corpus=lit["sat"], vocab_size=30, factor_dim=8, export_dir=str(tmp_path))
    module, data, _ = _fit(lit, cb)
    assert cb.export_path() == tmp_path / "sat-vocabulary"
    fresh = MaskedLMAdaptation(backbone=lit["backbone"], languages=["eng", "sat"])
    switch, _ = load_vocabulary(fresh.adapted, cb.export_path())  # the model's own tokenizer
    trained = cb.switch.vocabs["sat"]
    assert not torch.equal(trained.F, switch.build(cb.tokenizer.shared, cb.tokenizer.num_new, cb.config).F)
    torch.testing.assert_close(switch.vocabs["sat"].F, trained.F, rtol=0, atol=0)
    report = cb.report()
    assert report["acted"] and report["before"]["unk_word_rate"] == 1.0 and report["after"]["unk_rate"] == 0
    start = cb.switch.vocabs["sat"]
    assert start.F.requires_grad
    assert not cb.switch.handles and module.adapted.vocabulary_switch is None  # teardown detached
    assert not hasattr(data.tokenizer, "languages")
    state = cb.state_dict()
    again = NewScriptEmbeddings("sat", corpus=lit["sat"], vocab_size=30, factor_dim=8)
    again.load_state_dict(state)
    assert again.model == cb.model and again.acted
    other = NewScriptEmbeddings("sat", corpus=lit["sat"], vocab_size=25, factor_dim=8)
    other.model = train_vocabulary(SCRIPT, 25)
    with pytest.raises(XlpeftValueError, match="differs from the one built at setup"):
        other.load_state_dict(state)


def test_callback_can_decide_not_to_act(lit):
    from xlpeft.lightning.newscript import NewScriptEmbeddings
    cb = NewScriptEmbeddings("sat", corpus=lit["sat"], act="auto", unk_threshold=1.0)
    # not acting leaves a corpus of [UNK] alone: nothing to mask, so training is refused (it was a NaN loss)
    with pytest.raises(XlpeftValueError, match="can be masked-LM data only if they hold some text token"):
        _fit(lit, cb, steps=1)
    assert not cb.acted and cb.switch is None and cb.before.unk_rate > 0.5


def test_callback_refuses_an_empty_corpus_and_bad_options(lit):
    from xlpeft.lightning.newscript import NewScriptEmbeddings
    with pytest.raises(XlpeftValueError, match="`act` can be auto, always, never"):
        NewScriptEmbeddings("sat", act="sometimes")
    with pytest.raises(Exception, match="empty"):
        NewScriptEmbeddings("sat", corpus=lit["empty"]).texts()


def test_new_vocabulary_survives_checkpoint_and_resume(lit, tmp_path):
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    from xlpeft.lightning.newscript import NewScriptEmbeddings
    cb = NewScriptEmbeddings("sat", corpus=lit["sat"], vocab_size=30, factor_dim=8, keep=True)
    module, _, trainer = _fit(lit, cb, steps=2)
    trained = cb.switch.vocabs["sat"].F.detach().clone()
    path = tmp_path / "newscript.ckpt"
    trainer.save_checkpoint(path)
    assert any(k.startswith("adapted.vocabulary.") for k in torch.load(path, weights_only=True)["state_dict"])
    again = NewScriptEmbeddings("sat", corpus=lit["sat"], vocab_size=30, factor_dim=8, keep=True, seed=0)
    fresh = MaskedLMAdaptation(backbone=lit["backbone"], languages=["eng", "sat"], lr=1e-2)
    data = MLMDataModule(languages=["eng", "sat"], backbone=lit["backbone"],
                         files={"sat": lit["sat"], "eng": lit["eng"]}, batch_size=8, max_eval_lines=8)
    start = NewScriptEmbeddings("sat", corpus=lit["sat"], vocab_size=30, factor_dim=8, keep=True)
    start.setup(SimpleNamespace(datamodule=None), MaskedLMAdaptation(backbone=lit["backbone"]), "fit")
    assert not torch.equal(start.switch.vocabs["sat"].F, trained)  # a fresh vocabulary starts elsewhere …
    tiny_trainer(2, callbacks=[again]).fit(fresh, data, ckpt_path=str(path))
    assert again.model == cb.model and again.report()["before"] == cb.report()["before"]
    torch.testing.assert_close(again.switch.vocabs["sat"].F, trained, rtol=0, atol=0)  # … and resumes here
