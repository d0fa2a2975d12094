"""Zero-shot evaluation: the adapters that really run per example, passages, paired bootstrap."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lightning_tiny import perturb, save_tiny_backbone
from xlpeft import AdaptedModel
from xlpeft.data.bible import Verse
from xlpeft.data.genre import genre_examples, passages
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning import TaskAdaptation
from xlpeft.stats import bootstrap_ci, confusion, paired_delta

LANGS = ("eng", "swh", "tgl")


@pytest.fixture(scope="module", params=[False, True], ids=["default", "canonical"])
def task(request, tmp_path_factory: pytest.TempPathFactory) -> TaskAdaptation:
    """A TaskAdaptation over perturbed eng/swh/tgl language adapters (both placements)."""
    root = tmp_path_factory.mktemp("zeroshot")
    backbone = str(save_tiny_backbone(root / "tiny-bert"))
    model = AdaptedModel.from_pretrained(backbone, head="base")
    config = {"method": "bottleneck", "reduction_factor": 4, "original_ln_before": request.param}
    for lang in LANGS:
        model.add_adapter(lang, config)
    perturb(model, ("points.",), scale=0.3, seed=1)
    for lang in LANGS:
        model.save_adapter(lang, str(root / lang))
    module = TaskAdaptation(backbone, labels=["a", "b", "c"], task_adapter="genre", adapter=config,
                            language_adapters={l: str(root / l) for l in LANGS})
    perturb(module.adapted, ("points.",), scale=0.3, seed=2)  # a non-identity task adapter too
    return module.eval()


def _batch(langs: list[str]) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (len(langs), 6), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(len(langs)),
            "langs": list(langs)}


def _rows_run(module: TaskAdaptation, batch: dict) -> Counter:
    """Rows each named adapter processed in the first block (forward hooks on its down-projection)."""
    seen: Counter = Counter()
    handles = []
    for key, point in module.adapted.points.items():
        if not key.startswith("encoder-0-"):
            continue
        for name, adapter in point.adapters.items():
            handles.append(adapter.down.register_forward_hook(
                lambda m, args, out, name=name: seen.update({name: args[0].shape[0]})))
    router = module.adapted.state
    router.batched = False  # the per-group loop calls each adapter's modules: hooks see its rows
    try:
        with torch.no_grad():
            module(batch)
    finally:
        router.batched = True
        for h in handles:
            h.remove()
    return seen


MIXED = ["swh", "tgl", "swh", "eng"]


@pytest.mark.parametrize("mode, expected", [
    ("own", {"swh": 2, "tgl": 1, "eng": 1, "genre": 4}),
    ("source", {"eng": 4, "genre": 4}),
    ("none", {"genre": 4}),
])
def test_evaluation_runs_the_intended_adapters_per_example(task, mode, expected) -> None:
    task.eval_mode = mode
    assert _rows_run(task, _batch(MIXED)) == Counter(expected)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-group"])
def test_mixed_batch_equals_each_example_alone(task, batched) -> None:
    """The batched kernels and the per-group loop both give each row its own setup's output."""
    task.adapted.state.batched = batched
    task.eval_mode = "own"
    batch = _batch(MIXED)
    with torch.no_grad():
        mixed = task(batch)
        alone = torch.cat([task({k: (v[i:i + 1] if torch.is_tensor(v) else v[i:i + 1]) for k, v in batch.items()})
                           for i in range(len(MIXED))])
        source_mode = task.eval_mode = "source"
        as_source = task(batch)
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    assert source_mode == "source"
    assert (mixed[:3] - as_source[:3]).abs().max() > 1e-4  # own ≠ English for swh/tgl rows
    torch.testing.assert_close(mixed[3], as_source[3])     # eng row is the same in both modes
    task.adapted.state.batched = True


# ---------------------------------------------------------------------------------------- passages


def _verses(lang_gaps: set[int] = frozenset()) -> list[Verse]:
    return [Verse(40, 1, v, f"v{v}") for v in range(1, 14) if v not in lang_gaps]


def test_passages_group_consecutive_verses_by_slot() -> None:
    out = passages(_verses(), 6)
    assert [(p.verse, p.text) for p in out] == [
        (1, "v1 v2 v3 v4 v5 v6"), (7, "v7 v8 v9 v10 v11 v12"), (13, "v13")]
    assert passages(_verses(), 1) == _verses()


def test_passages_align_across_editions_with_missing_verses() -> None:
    full, gappy = passages(_verses(), 4), passages(_verses({2, 9}), 4)
    assert [p.verse for p in full] == [p.verse for p in gappy] == [1, 5, 9, 13]
    assert gappy[0].text == "v1 v3 v4"


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_passages_reject_bad_sizes(bad) -> None:
    with pytest.raises(XlpeftValueError, match="`passage` can be a positive integer"):
        passages(_verses(), bad)


def test_genre_passages_of_the_embedded_bible_share_keys_across_languages() -> None:
    eng = genre_examples("eng", "test", passage=6)
    swh = genre_examples("swh", "test", passage=6)
    keys = {(r["book"], r["chapter"], r["verse"]) for r in eng}
    assert keys == {(r["book"], r["chapter"], r["verse"]) for r in swh}
    assert all((r["verse"] - 1) % 6 == 0 for r in eng)
    assert len(eng) < len(genre_examples("eng", "test")) / 4
    assert {r["label"] for r in eng} == {r["label"] for r in genre_examples("eng", "test")}


def test_genre_examples_from_user_verses() -> None:
    rows = genre_examples("xyz", "train", verses=[Verse(1, c, v, f"t{c}.{v}") for c in range(1, 51)
                                                  for v in range(1, 5)], passage=2)
    assert rows and all(r["lang"] == "xyz" and r["label"] == "Law" for r in rows)
    assert all(" " in r["text"] for r in rows)


# ---------------------------------------------------------------------------------------- statistics


def test_paired_delta_of_identical_predictions_is_exactly_zero() -> None:
    correct = np.random.default_rng(0).integers(0, 2, size=(3, 50))
    assert paired_delta(correct, correct, 500) == {"delta": 0.0, "lo": 0.0, "hi": 0.0}


def test_paired_delta_ci_covers_the_difference_and_excludes_zero_when_clear() -> None:
    rng = np.random.default_rng(1)
    b = rng.integers(0, 2, size=(2, 400))
    a = np.where(rng.random((2, 400)) < 0.3, 1, b)  # a fixes ~30 % of b's errors
    d = paired_delta(a, b, 1000)
    assert d["lo"] < d["delta"] < d["hi"]
    assert d["lo"] > 0
    assert d["delta"] == pytest.approx(a.mean() - b.mean())


def test_bootstrap_ci_is_paired_over_seeds() -> None:
    """Seeds share example draws: two identical seeds give the same CI as one."""
    one = np.random.default_rng(2).integers(0, 2, size=(1, 80)).astype(float)
    ci1 = bootstrap_ci(one, 300, np.random.default_rng(3))
    ci2 = bootstrap_ci(np.concatenate([one, one]), 300, np.random.default_rng(3))
    assert ci1 == pytest.approx(ci2)


def test_confusion_counts() -> None:
    out = confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert out == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


# ---------------------------------------------------------------------------------------- harness


def test_transfer_run_writes_a_table_with_cis(tmp_path) -> None:
    from xlpeft.lightning.transfer import EvalConfig, Recipe, run
    backbone = str(save_tiny_backbone(tmp_path / "tiny-bert"))
    cfg = EvalConfig(out=str(tmp_path / "out"), backbone=backbone, targets=("swh",), passage=4, max_length=16,
                     per_genre=2, eval_per_genre=1, seeds=(0, 1), batch_size=4, lines_per_language=20,
                     bootstrap=50, recipes=[Recipe("tiny", adapter_steps=2, task_steps=2, leave_out=(-1,),
                                                   language_dropout=0.5)])
    results = run(cfg, quiet=True)
    rows = results["recipes"][0]["languages"]
    assert rows["eng"]["role"] == "source (in-language)" and rows["swh"]["role"] == "zero-shot target"
    assert rows["eng"]["examples"] == rows["swh"]["examples"] > 0
    for row in rows.values():
        for setup in ("none", "source", "own"):
            assert row[setup]["lo"] <= row[setup]["acc"] <= row[setup]["hi"]
            assert sum(map(sum, row["confusion"][setup])) == row["examples"]
    assert results["recipes"][0]["recipe"]["leave_out"] == (-1,)
    for name in ("transfer.json", "transfer.md", "transfer.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "Δ own − English" in (tmp_path / "out" / "transfer.md").read_text()
