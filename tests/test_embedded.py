"""Tests for the embedded model and corpus, on the real files (no mocks).

The first run converts the GGUF (about a minute, under ``$SAE_GBA_CACHE`` or
``~/.cache/sae_gba``); later runs reuse it. The tests that need the model are marked
``slow`` but run by default.
"""

import bz2

import pytest
import torch

from sae_gba.embedded import (
    EMBEDDED_MODEL_NAME,
    Article,
    cache_dir,
    clean_wikitext,
    embedded_token_dataset,
    load_embedded_tokenizer,
    split_articles,
    wikipedia_articles,
)
from sae_gba.lm.models import load_model
from sae_gba.lm.windows import tokenize_windows


@pytest.fixture(scope="module")
def articles() -> list[Article]:
    return wikipedia_articles()


@pytest.fixture(scope="module")
def tokenizer():
    return load_embedded_tokenizer()


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_GBA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SAE_GBA_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "sae_gba")


def test_corpus_parses_to_plain_articles(articles):
    assert len(articles) >= 100
    titles = [a.title for a in articles]
    assert titles == sorted(titles) and len(set(titles)) == len(titles)
    assert all(a.text for a in articles)
    assert not any("#redirect" in a.text.lower() for a in articles)
    assert not any("<ref" in a.text for a in articles)
    with_markup = [a.title for a in articles if "{{" in a.text or "[[" in a.text]
    assert len(with_markup) <= len(articles) // 20, with_markup
    assert sum(len(a.text) for a in articles) > 2_000_000


def test_clean_wikitext_strips_nested_markup():
    raw = (
        "{{Infobox person|name={{nowrap|A B}}}}'''Ada''' was a [[Mathematician|"
        'mathematician]] from [[London]].<ref name="x">Cite {{cite web|url=u}}</ref>'
        "<ref name=y/>\n== Early life ==\n[[File:Ada.jpg|thumb|Ada in [[1840]] [left]]]\n"
        "She wrote <i>notes</i>&nbsp;here.<!-- hidden -->\n{| class=wikitable\n|-\n"
        "| cell {{small|x}}\n|}\n* listed [http://example.com site]\n"
        "[[Category:People]]\n[[de:Ada]]\n== References ==\n{{reflist}}"
    )
    assert clean_wikitext(raw) == (
        "Ada was a mathematician from London.\nEarly life\n"
        "She wrote notes\xa0here.\n\nlisted site"
    )


def test_corpus_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.xml.bz2"
    with pytest.raises(FileNotFoundError, match="missing.xml.bz2"):
        wikipedia_articles(missing)
    not_bz2 = tmp_path / "not_bz2.xml.bz2"
    not_bz2.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="corpus file .*not_bz2"):
        wikipedia_articles(not_bz2)
    truncated = tmp_path / "truncated.xml.bz2"
    truncated.write_bytes(bz2.compress(b"<mediawiki><page><title>A</title>"))
    with pytest.raises(ValueError, match="corpus file .*truncated"):
        wikipedia_articles(truncated)


def test_split_is_disjoint_deterministic_and_covering(articles):
    train, held = split_articles(articles, held_out_fraction=0.1, seed=0)
    train_titles, held_titles = {a.title for a in train}, {a.title for a in held}
    assert not train_titles & held_titles
    assert train_titles | held_titles == {a.title for a in articles}
    assert len(held) == round(0.1 * len(articles))
    assert split_articles(articles, held_out_fraction=0.1, seed=0) == (train, held)
    assert split_articles(articles, held_out_fraction=0.1, seed=1)[1] != held


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_bad_held_out_fraction_is_named(articles, fraction):
    with pytest.raises(ValueError, match=rf"held_out_fraction.*{fraction}"):
        split_articles(articles, held_out_fraction=fraction)
    with pytest.raises(ValueError, match="held_out_fraction"):
        embedded_token_dataset("train", held_out_fraction=fraction)


def test_bad_dataset_arguments_are_named():
    with pytest.raises(ValueError, match="context_size.*>= 2.*1"):
        embedded_token_dataset("train", context_size=1)
    with pytest.raises(ValueError, match="split.*'test'"):
        embedded_token_dataset("test")  # type: ignore[arg-type]


@pytest.mark.slow
def test_windows_start_with_bos_and_keep_text_order(tokenizer, articles):
    texts = [a.text for a in articles[:3]]
    windows = tokenize_windows(tokenizer, texts, context_size=32)
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    ids = tokenizer.encode(texts[0], add_special_tokens=False)
    for text in texts[1:]:
        ids += sep + tokenizer.encode(text, add_special_tokens=False)
    assert windows.dtype == torch.int64
    assert windows.shape == (len(ids) // 31, 32)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert windows[:, 1:].flatten().tolist() == ids[: windows.shape[0] * 31]
    with pytest.raises(ValueError, match="context_size.*>= 2.*got 1"):
        tokenize_windows(tokenizer, texts, context_size=1)


# SAELens's own notices (epoch count, tensor copy) say nothing about this module.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning:sae_lens")
def test_embedded_model_predicts_held_out_wikipedia():
    """Integration: real Gemma-3-270M on held-out articles, fed as SAELens feeds it."""
    from sae_lens.training.activations_store import ActivationsStore

    held_out = embedded_token_dataset("held_out", context_size=128)
    all_rows = torch.tensor(held_out["tokens"])
    assert held_out.features["tokens"].length == 128 and len(held_out) * 128 > 20_000
    again = embedded_token_dataset("held_out", context_size=128)  # from the cache
    assert torch.equal(torch.tensor(again["tokens"]), all_rows)
    model = load_model(EMBEDDED_MODEL_NAME)
    assert (model.cfg.n_layers, model.cfg.d_model) == (18, 640)
    assert (all_rows[:, 0] == model.tokenizer.bos_token_id).all()
    tokens = all_rows[:4]
    with torch.no_grad():
        loss = model(tokens, return_type="loss").item()
    assert loss < 4.5, f"mean next-token loss {loss:.2f} on held-out windows"

    store = ActivationsStore(
        model=model,
        dataset=held_out,
        streaming=False,
        hook_name="blocks.9.hook_resid_post",
        hook_head_index=None,
        context_size=128,
        d_in=640,
        n_batches_in_buffer=1,
        total_training_tokens=4 * 128,
        store_batch_size_prompts=4,
        train_batch_size_tokens=256,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    batch = store.get_batch_tokens()
    assert torch.equal(batch, tokens)
    assert store.get_activations(batch).shape == (4, 128, 640)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning:sae_lens")
@pytest.mark.parametrize("architecture", ["weighted_topk", "weighted_gba"])
def test_weighted_architectures_train_on_the_embedded_model(tmp_path, architecture):
    """A short run of a weighted SAE on the real model, through SAELens's runner."""
    import dataclasses

    from sae_lens import SAE

    from sae_gba.presets import EMBEDDED, train_preset

    preset = dataclasses.replace(
        EMBEDDED, store_batch_size_prompts=4, n_batches_in_buffer=4
    )
    sae = train_preset(
        preset,
        tmp_path,
        d_sae=128,
        training_tokens=512 * 6,
        architecture=architecture,
        weight_estimation_batches=2,
        **({"k": 16} if architecture == "weighted_topk" else {}),
    )
    assert sae.input_weights_source == "variance"
    assert torch.isfinite(sae.input_weights).all()
    assert sae.input_weights.pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)
    exported = SAE.load_from_disk(tmp_path / "sae")
    expected = "topk" if architecture == "weighted_topk" else "jumprelu"
    assert exported.cfg.architecture() == expected
    assert (tmp_path / "sae" / "input_weights.safetensors").is_file()
