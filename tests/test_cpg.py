"""CPG for NMT: generated modules == their materialised copies, routing per example, new pairs and languages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import tiny_model, tiny_tokenizer
from xlpeft.core.model import AdaptedModel
from xlpeft.data.parallel import Pair, Seq2SeqCollator, encode_pairs
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.generators.cpg import CPGConfig, CPGGenerator
from xlpeft.lightning.cpg import CPGTranslation
from xlpeft.lightning.translation import TranslationAdaptation

LANGS = ["spa", "nah", "eng"]
PAIRS = [Pair("hello world", "habari ya dunia", "spa", "nah"), Pair("habari dunia", "the book", "nah", "spa"),
         Pair("read the book", "kitabu", "spa", "eng"), Pair("a book", "hello world", "eng", "nah")]
SMALL = {"reduction_factor": 4, "basis": 4, "language_dim": 8, "typology_hidden": 16}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cpg") / "m2m"
    tiny_model("m2m_100", "seq2seq").save_pretrained(path)
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["__en__", "__es__", "__nah__", "__pt__"]})
    tok.save_pretrained(path)
    return path


def cpg(folder: Path, seed: int = 0, **fields) -> CPGTranslation:
    m = CPGTranslation(backbone=str(folder), languages=LANGS, generator_config={**SMALL, **fields})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-identity: a new generator emits identity adapters (zero up-basis)
        for p in m.generator.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return m.eval()


def batch_of(m: TranslationAdaptation, pairs: list[Pair]) -> dict:
    return Seq2SeqCollator(m.format.tokenizer.pad_token_id)(encode_pairs(m.format, pairs, 16, "test"))


def test_generated_modules_equal_their_materialised_copies(folder, tmp_path):
    m = cpg(folder)
    written = m.export_adapters(tmp_path)
    assert [p.name for p in written] == LANGS
    copy = TranslationAdaptation(backbone=str(folder), modules="monolingual", languages=LANGS,
                                 language_adapters={p.name: str(p) for p in written}).eval()
    batch = batch_of(m, PAIRS)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4}
    with torch.no_grad():
        torch.testing.assert_close(m(batch), copy(batch), rtol=1e-5, atol=1e-5)
        assert torch.equal(m.generate_ids(batch, **kw), copy.generate_ids(batch, **kw))
        bare = TranslationAdaptation(backbone=str(folder), modules="none").eval()
        assert not torch.allclose(m(batch), bare(batch), atol=1e-3)  # the generated modules act


def test_encoder_by_source_decoder_by_target_per_example(folder):
    m = cpg(folder)
    batch = batch_of(m, PAIRS)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4}
    with torch.no_grad():
        logits, ids = m(batch), m.generate_ids(batch, **kw)
        for i, pair in enumerate(PAIRS):
            one = batch_of(m, [pair])
            n = one["labels"].shape[1]
            torch.testing.assert_close(logits[i, :n], m(one)[0], rtol=1e-4, atol=1e-4)
            assert torch.equal(ids[i], m.generate_ids(one, **kw)[0])
    assert m.setups(["spa", "nah"], ["nah", "eng"]) == (["spa", "nah"], ["nah", "eng"])


def test_a_new_language_is_generated_from_typology_with_no_trained_module(folder):
    m = cpg(folder)
    assert "por" not in m.adapted.configs
    batch = batch_of(m, [Pair("hello world", "the book", "spa", "por")])
    with torch.no_grad():
        out = m(batch)
        assert "por" in m.adapted.configs  # attached on first use
        as_spanish = m(dict(batch, tgt_langs=["spa"]))
    assert not torch.allclose(out, as_spanish, atol=1e-4)  # its own generated decoder adapters


def test_learned_embeddings_train_only_the_batch_languages(folder):
    m = cpg(folder, embedding="learned", init="random").train()
    assert sorted(m.generator.table) == ["eng", "nci", "spa"]  # URIEL codes (nah → Classical Nahuatl)
    loss = m.training_step(batch_of(m, PAIRS[:2]), 0)  # spa↔nah only
    loss.backward()
    grads = {k: p.grad is not None and bool(p.grad.abs().sum() > 0) for k, p in m.generator.table.items()}
    assert grads["spa"] and not grads["eng"] and sum(grads.values()) == 2, grads
    assert all(p.grad is None for p in m.generator.typology.parameters())  # typology MLP unused when learned
    with pytest.raises(XlpeftKeyError, match="no .* module"):
        m(batch_of(m, [Pair("hello world", "the book", "spa", "por")]))


def test_typology_initialised_learned_embeddings_start_at_the_mlp_output(folder):
    gen = CPGTranslation(backbone=str(folder), languages=LANGS,
                         generator_config={**SMALL, "embedding": "learned"}).generator
    for code, vector in gen.table.items():
        torch.testing.assert_close(vector.detach(), gen.typology(code).detach())


def test_the_generator_saves_and_loads(folder, tmp_path):
    m = cpg(folder, seed=2)
    from xlpeft.generators.files import save_generator
    save_generator(m.generator, tmp_path / "gen")
    again = CPGTranslation(backbone=str(folder), languages=LANGS, load_generator_from=str(tmp_path / "gen")).eval()
    batch = batch_of(m, PAIRS)
    with torch.no_grad():
        torch.testing.assert_close(again(batch), m(batch))


def test_bad_configs_are_refused(folder):
    with pytest.raises(XlpeftValueError, match="needs `languages`"):
        CPGConfig(embedding="learned")
    with pytest.raises(XlpeftValueError, match="with embedding='learned' only"):
        CPGConfig(languages=("spa",))
    with pytest.raises(XlpeftValueError, match="`embedding` can be"):
        CPGConfig(embedding="onehot")
    encoder_only = AdaptedModel(tiny_model("bert", "base"))
    with pytest.raises(XlpeftValueError, match="needs an encoder-decoder"):
        CPGGenerator.for_model(encoder_only, CPGConfig(**SMALL))
    with pytest.raises(XlpeftValueError, match="one or more language codes"):
        CPGTranslation(backbone=str(folder), languages=[])


TINY_TAGS = '{"spa":"[unused0]","eng":"[unused1]","por":"[unused2]","nah":"[unused3]","ote":"[unused4]"}'


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nmt-cpg", "nmt-lass", "badx-language-adapter", "phylogeny-adapters"])
def test_modular_configs_fit_through_the_cli(name, tmp_path):
    """`xlpeft fit --config configs/<name>.yaml` for 2 steps + validation on the tiny BERT (warm-started for NMT)."""
    from lightning_tiny import save_tiny_backbone
    from xlpeft.lightning.cli import cli

    backbone = str(save_tiny_backbone(tmp_path / "bert"))
    config = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    args = ["fit", "--config", str(config), f"--model.init_args.backbone={backbone}",
            f"--data.init_args.backbone={backbone}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    if name.startswith("nmt"):
        args += [f"--data.init_args.lang_tokens={TINY_TAGS}", "--data.init_args.max_train_pairs=40",
                 "--data.init_args.max_eval_pairs=4", "--model.init_args.max_new_tokens=4"]
    else:
        args += ["--data.init_args.max_train_lines=50", "--data.init_args.max_eval_lines=10"]
    out = {"nmt-cpg": "--model.init_args.export_generator", "nmt-lass": "--model.init_args.export_masks"}.get(name)
    if out:
        args.append(f"{out}={tmp_path / 'artefact'}")
    if name == "nmt-lass":
        args.append("--model.init_args.search_steps=2")
    else:
        args.append(f"--trainer.callbacks.init_args.dirpath={tmp_path / 'adapters'}")
    run = cli(args=args)
    assert run.trainer.global_step == 2
    assert (tmp_path / "artefact").is_dir() if out else any((tmp_path / "adapters").iterdir())
