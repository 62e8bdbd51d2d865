"""The latent page (``sae-gba inspect``): a tiny real model and a GBA SAE trained on it
through SAELens's runner; the page is read back with an HTML parser and, where
Chromium is installed, rendered in it."""

import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

from sae_gba.latent_page import (
    PageOptions,
    build_latent_page,
    hook_activations,
    select_latents,
)
from tests.helpers import (
    cli_error,
    runner_dict,
    save_word_tokenizer,
    tiny_model,
    token_dataset,
)

N_GROUPS, D_SAE, HOOK = 3, 96, "blocks.0.hook_resid_post"
BROWSER = "/usr/bin/chromium"


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]):
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], ""

    def find_all(self, tag: str, cls: str | None = None) -> list["Node"]:
        found = []
        for child in self.children:
            if child.tag == tag and (cls is None or cls in child.classes):
                found.append(child)
            found.extend(child.find_all(tag, cls))
        return found

    def find(self, tag: str, cls: str | None = None) -> "Node":
        (node,) = self.find_all(tag, cls)[:1]
        return node

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    @property
    def all_text(self) -> str:
        return self.text + "".join(c.all_text for c in self.children)


class TreeBuilder(HTMLParser):
    """Parses a page into a tree of ``Node`` (html.parser; void tags closed)."""

    VOID = {"meta", "link", "input", "br", "img"}

    def __init__(self):
        super().__init__()
        self.root = Node("root", {})
        self.stack = [self.root]
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.urls += [attrs[k] for k in ("src", "href") if k in attrs]
        node = Node(tag, attrs)
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        target = self.stack[-1]
        if target.children:  # text after a child: keep it in document order
            tail = Node("#text", {})
            tail.text = data
            target.children.append(tail)
        else:
            target.text += data


def parse(path: Path) -> TreeBuilder:
    builder = TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    builder.close()
    assert builder.stack == [builder.root], "unclosed tags"
    return builder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, exported GBA SAE, held-out windows) at toy size."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("latent_page")
    save_word_tokenizer(folder / "tokenizer", 64)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    model = tiny_model(tokenizer=tokenizer, model_name="tiny-words")
    with torch.no_grad():  # a final-norm scale the unembedding effects must include
        model.ln_final.w.copy_(
            torch.rand(32, generator=torch.Generator().manual_seed(2)) * 2
        )
    sae_cfg = {
        "architecture": "gba",
        "d_in": 32,
        "d_sae": D_SAE,
        "n_groups": N_GROUPS,
        "adaptation_interval": 5,
    }
    cfg = LanguageModelSAERunnerConfig.from_dict(
        runner_dict(sae_cfg, str(folder / "sae"), training_tokens=64 * 20)
    )
    LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=token_dataset()
    ).run()
    held_out = torch.randint(
        4, 64, (40, 16), generator=torch.Generator().manual_seed(7)
    )
    held_out[:, 0] = tokenizer.bos_token_id
    return model, SAE.load_from_disk(folder / "sae"), held_out


@pytest.fixture(scope="module")
def page(trained, tmp_path_factory):
    model, sae, tokens = trained
    out = tmp_path_factory.mktemp("page")
    options = PageOptions(latents="groups", n_latents=9, top_contexts=5)
    return build_latent_page(sae, model, tokens, out, options, progress=False)


@torch.no_grad()
def _reference(model, sae, tokens):
    """Activations of every latent on every text token, computed independently."""
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    acts = sae.encode(cache[HOOK])  # (windows, context, d_sae)
    special = torch.tensor([model.tokenizer.bos_token_id, 0, 1])
    acts[torch.isin(tokens, special)] = 0
    return acts


def test_page__shows_each_chosen_latent_as_an_independent_count_says(trained, page):
    model, sae, tokens = trained
    tree = parse(page)
    assert all(url.startswith("data:") for url in tree.urls), tree.urls
    acts = _reference(model, sae, tokens)
    n_text = int((tokens != model.tokenizer.bos_token_id).sum())
    targets = sae.cfg.metadata.gba_target_frequencies
    cards = tree.root.find_all("article", "latent")
    ids = [int(c.attrs["id"].removeprefix("latent-")) for c in cards]
    group_of = [i * N_GROUPS // D_SAE for i in ids]
    assert len(ids) == 9 and sorted(group_of) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for card, latent, group in zip(cards, ids, group_of, strict=True):
        values = acts[..., latent]
        fired = values[values > 0]
        assert len(fired) > 0  # "groups" samples latents that fired
        frequency = len(fired) / n_text
        assert card.find("b", "frequency").all_text == f"{frequency:.3g}"
        assert card.find("b", "target").all_text == f"{targets[group]:.3g}"
        # Histogram: 24 bars whose counts add up to the latent's firings.
        bars = card.find_all("rect")
        assert len(bars) == 24
        assert sum(int(b.find("title").all_text.rsplit(": ", 1)[1]) for b in bars) == (
            len(fired)
        )
        # Contexts: ranked by peak; the first peak is the latent's maximum, outlined
        # at the token where the reference finds it.
        contexts = card.find_all("li")
        peaks = [float(li.find("span", "peak").all_text) for li in contexts]
        assert peaks == sorted(peaks, reverse=True) and len(contexts) >= 1
        window = int(contexts[0].attrs["data-window"])
        peak_token = contexts[0].find("span", "max")
        assert float(peak_token.attrs["title"]) == pytest.approx(
            fired.max().item(), rel=1e-3
        )
        position = values[window].argmax().item()
        word = model.tokenizer.decode([tokens[window, position].item()])
        assert peak_token.all_text == word
        # Unembedding: the decoder direction through ln_final's scale and W_U.
        logits = (sae.W_dec[latent] * model.ln_final.w) @ model.W_U
        rows = card.find("table", "logits").find_all("tr")[1:]
        promoted = [r.find("td", "up").all_text for r in rows]
        suppressed = [r.find("td", "down").all_text for r in rows]
        assert promoted[0] == model.tokenizer.decode([logits.argmax().item()])
        assert suppressed[0] == model.tokenizer.decode([logits.argmin().item()])
        assert len(promoted) == 8


def test_page__from_given_activations_is_the_same_page(trained, page, tmp_path):
    model, sae, tokens = trained
    acts = hook_activations(model, HOOK, tokens, progress=False)
    options = PageOptions(latents="groups", n_latents=9, top_contexts=5)
    again = build_latent_page(
        sae, model, tokens, tmp_path, options, progress=False, activations=acts
    )
    assert again.read_text() == page.read_text()
    with pytest.raises(ValueError, match="do not match tokens"):
        build_latent_page(sae, model, tokens[:3], tmp_path, activations=acts)


def test_page__group_table_has_every_group_against_its_target(trained, page):
    _, sae, _ = trained
    table = parse(page).root.find("table")
    assert table.attrs["id"] == "groups"
    rows = [[td.all_text for td in tr.find_all("td")] for tr in table.find_all("tr")]
    rows = [r for r in rows if r]
    targets = sae.cfg.metadata.gba_target_frequencies
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert [r[2] for r in rows] == [f"{t:.3g}" for t in targets]
    assert [r[-1] for r in rows] == ["3", "3", "3"]


def test_select_latents__each_mode():
    frequencies = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.3, 0.2])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert select_latents(frequencies, PageOptions(n_latents=3)) == [1, 4, 5]
    chosen = select_latents(frequencies, PageOptions("random", n_latents=10, seed=3))
    assert chosen == [1, 2, 4, 5]  # every latent that fired, none that did not
    by_group = select_latents(frequencies, PageOptions("groups", n_latents=2), groups)
    assert len(by_group) == 2 and by_group[0] in (1, 2) and by_group[1] in (4, 5)
    assert select_latents(frequencies, PageOptions([5, 0, 5])) == [5, 0]
    with pytest.raises(ValueError, match=r"latents=\[6\].*\[0, 6\)"):
        select_latents(frequencies, PageOptions([6]))
    with pytest.raises(ValueError, match="'groups' needs a GBA-trained SAE"):
        select_latents(frequencies, PageOptions("groups"))


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("latents", "busy", "must be one of"),
        ("n_latents", 0, "must be >= 1"),
        ("context_before", -1, "must be >= 0"),
    ],
)
def test_page_options__invalid_values_name_the_field(field, value, fragment):
    with pytest.raises(ValueError, match=f"{field}={value!r}.*{fragment}"):
        PageOptions(**{field: value})


def test_cli_inspect__reports_bad_input(tmp_path, capsys):
    line = cli_error(capsys, ["inspect", str(tmp_path / "missing"), "--out", "x"])
    assert line == f"SAE folder {tmp_path / 'missing'} does not exist"
    line = cli_error(
        capsys, ["inspect", str(tmp_path), "--out", "x", "--latents", "a,b"]
    )
    assert line == (
        "--latents 'a,b' is invalid: expected frequent, random, groups or "
        "comma-separated latent ids"
    )


def _chromium_missing() -> str | None:
    if not Path(BROWSER).is_file() or not shutil.which("chromedriver"):
        return f"no headless browser: {BROWSER} and chromedriver (Debian's chromium, chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    return None


@pytest.mark.skipif(_chromium_missing() is not None, reason=str(_chromium_missing()))
def test_page__renders_in_chromium_without_console_errors(page):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=Service(shutil.which("chromedriver"))
    )
    try:
        driver.get(page.as_uri())
        body = driver.find_element(By.TAG_NAME, "body")
        assert "Latent" in body.text and len(body.text) > 500
        cards = driver.find_elements(By.CSS_SELECTOR, "article.latent")
        assert len(cards) == 9 and all(c.is_displayed() for c in cards)
        # The filter keeps the cards whose id or tokens contain the query.
        first_id = cards[0].get_attribute("id").removeprefix("latent-")
        expected = [c for c in cards if first_id in c.get_attribute("data-search")]
        driver.find_element(By.ID, "search").send_keys(first_id)
        visible = [c for c in cards if c.is_displayed()]
        assert visible == expected and 1 <= len(visible) < 9
        assert driver.find_element(By.ID, "shown").text == str(len(visible))
        errors = [e for e in driver.get_log("browser") if e["level"] != "INFO"]
        assert errors == []
    finally:
        driver.quit()
