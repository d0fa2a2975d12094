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
from xlpeft.errors import XlpeftValueError
from xlpeft.vocab import NewVocabConfig, ScriptTokenizer, add_new_vocabulary, coverage, train_vocabulary

LATIN = ["the lord said unto them and he shall be with him", "and they be not in the land of the lord",
         "hello world the book is read", "mungu na nchi juu ya maji katika hapo"] * 20
SCRIPT = [transliterate(t) for t in LATIN]
CONFIG = NewVocabConfig(vocab_size=30, factor_dim=8)


@pytest.fixture()
def model() -> tuple[AdaptedModel, object]:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    am.add_adapter("eng", "madx-language")
    am.add_adapter("sat", "madx-language")
    perturb(am, "eng", seed=1)
    perturb(am, "sat", seed=2)
    return am, tiny_bert_tokenizer()


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


def test_callback_trains_the_new_vocabulary_and_puts_everything_back(lit):
    from xlpeft.lightning.newscript import NewScriptEmbeddings
    cb = NewScriptEmbeddings("sat", corpus=lit["sat"], vocab_size=30, factor_dim=8)
    module, data, _ = _fit(lit, cb)
    report = cb.report()
    assert report["acted"] and report["before"]["unk_word_rate"] == 1.0 and report["after"]["unk_rate"] == 0
    start = cb.switch.vocabs["sat"]
    assert start.F.requires_grad
    assert not cb.switch.handles and "new_vocab" not in module._modules  # teardown detached
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
    module, _, _ = _fit(lit, cb, steps=1)
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
    assert any(k.startswith("new_vocab.") for k in torch.load(path, weights_only=False)["state_dict"])
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
