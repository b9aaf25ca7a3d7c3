"""gateway.banner: markup, texts, language choice, assets and the settings page."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import re
import shutil
import subprocess
from collections.abc import Mapping
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from gateway.banner import Banner, next_path, parse_accept_language
from gateway.config import ConfigError, Settings, load_settings

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node] = dataclasses.field(default_factory=list)
    text: str = ""

    def iter(self) -> Any:
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag) and all(n.attrs.get(k.rstrip("_")) == v for k, v in attrs.items())
        ]

    def find(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]

    def attr(self, name: str) -> str:
        value = self.attrs[name]
        assert value is not None, f"{name} has no value"
        return value

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)

    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()


class TreeBuilder(HTMLParser):
    """Strict enough for our own markup: every non-void element must be closed, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = [name for name, _ in attrs]
        assert len(names) == len(set(names)), f"duplicate attribute in <{tag}>"
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raise AssertionError(f"self-closing <{tag}/> in HTML markup")

    def handle_endtag(self, tag: str) -> None:
        assert tag not in VOID, f"end tag for void element {tag}"
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text += data


def parse(markup: bytes) -> Node:
    builder = TreeBuilder()
    builder.feed(markup.decode("utf-8"))
    builder.close()
    assert builder.stack == [builder.root], f"unclosed: {[n.tag for n in builder.stack[1:]]}"
    return builder.root


def check_references(tree: Node) -> None:
    """ids unique; every label/aria reference points at an element that exists."""
    ids = [n.attrs["id"] for n in tree.iter() if n.attrs.get("id")]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for node in tree.iter():
        for attr in ("for", "aria-labelledby", "aria-describedby"):
            for ref in (node.attrs.get(attr) or "").split():
                assert ref in ids, f"{attr}={ref!r} points nowhere"


def make_settings(**overrides: Any) -> Settings:
    return load_settings(environ={}, overrides=overrides)


def make_banner(**overrides: Any) -> Banner:
    return Banner(make_settings(**overrides))


MULTI = {
    "consent": {
        "categories": ["analytics", "marketing"],
        "category": {"marketing": {"label": "Marketing", "description": "Ads measurement."}},
    },
    "banner": {
        "texts": {
            "de": {"title": "Ihre Wahl", "accept_all": "Alle akzeptieren", "reject_all": "Alle ablehnen",
                   "analytics_label": "Statistik"},
            "fr": {"title": "Vos choix"},
            "pt-BR": {"title": "Suas escolhas"},
        }
    },
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- markup


@pytest.fixture(scope="module")
def banner() -> Banner:
    return make_banner()


@pytest.fixture(scope="module")
def tree(banner: Banner) -> Node:
    return parse(banner.snippet("en", "/downloads/release/", True))


def test_markup_is_well_formed_and_references_resolve(banner: Banner) -> None:
    for markup in (
        banner.snippet("en", "/x", True),
        banner.snippet("en", "/x", False),
        banner.settings_page("en", frozenset({"analytics"}), "/x"),
        make_banner(**MULTI).snippet("de", "/x", True),
    ):
        check_references(parse(markup))


def test_accept_and_reject_are_equal_buttons(tree: Node) -> None:
    actions = tree.find(class_="pg-actions")
    buttons = actions.find_all("button")
    assert [b.attrs["value"] for b in buttons] == ["reject_all", "accept_all"]
    reject, accept = buttons
    # Same element, type, name and classes: nothing makes one choice look easier than the other (CNIL).
    assert reject.attrs.keys() == accept.attrs.keys()
    assert {k: v for k, v in reject.attrs.items() if k != "value"} == {
        k: v for k, v in accept.attrs.items() if k != "value"
    }
    assert reject.attrs["type"] == "submit" and reject.attrs["name"] == "action"
    assert "hidden" not in reject.attrs and "disabled" not in reject.attrs
    assert (reject.all_text(), accept.all_text()) == ("Reject all", "Accept all")
    # The first submit button is the form's default (implicit submission): it is the refusal.
    form = tree.find("form")
    first_submit = next(n for n in form.iter() if n.tag == "button" and n.attrs.get("type") == "submit")
    assert first_submit is reject


def test_form_posts_to_the_consent_endpoint_with_next(tree: Node) -> None:
    form = tree.find("form")
    assert (form.attrs["method"], form.attrs["action"]) == ("post", "/_privacy/consent")
    assert form.find("input", type="hidden").attrs == {"type": "hidden", "name": "next", "value": "/downloads/release/"}
    save = form.find("button", value="save")
    assert save.attrs["type"] == "submit" and save.attrs["name"] == "action"
    assert save.all_text() == "Save choices"


def test_prefix_is_used_everywhere() -> None:
    markup = make_banner(prefix="/gw").snippet("en", "/", True)
    tree = parse(markup)
    assert tree.find("form").attrs["action"] == "/gw/consent"
    assert tree.find("a", class_="pg-settings-link").attrs["href"] == "/gw/settings?next=/"
    assert tree.find("link").attr("href").startswith("/gw/banner.css?v=")
    assert tree.find("script").attr("src").startswith("/gw/banner.js?v=")
    assert b"/_privacy" not in markup


def test_dialog_is_labelled_for_screen_readers(tree: Node) -> None:
    dialog = tree.find(role="dialog")
    assert dialog.attrs["aria-modal"] == "false"
    assert tree.find(id=dialog.attrs["aria-labelledby"] or "").all_text() == "Your privacy choices"
    description = tree.find(id=dialog.attrs["aria-describedby"] or "")
    assert "analytics" in description.all_text()
    assert description.find("a").attrs["href"] == "/privacy/"  # site.privacy_url
    assert dialog.attrs["lang"] == "en"
    assert tree.find(role="status") is not None  # where the script announces "saved"


def test_categories_are_unchecked_labelled_and_described() -> None:
    tree = parse(make_banner(**MULTI).snippet("en", "/", True))
    details = tree.find("details")
    assert "open" not in details.attrs
    assert details.find("summary").all_text() == "Settings"
    boxes = details.find_all("input", type="checkbox")
    assert [b.attrs["value"] for b in boxes] == ["analytics", "marketing"]
    for box in boxes:
        assert "checked" not in box.attrs  # deny by default
        assert box.attrs["name"] == "category"
        label = tree.find("label", for_=box.attrs["id"] or "")
        assert label.all_text() in ("Analytics", "Marketing")
        assert tree.find(id=box.attrs["aria-describedby"] or "").all_text()
    assert tree.find("label", for_="pg-category-marketing").all_text() == "Marketing"
    assert tree.find(id="pg-category-marketing-description").all_text() == "Ads measurement."


def test_settings_link_is_on_every_page_and_banner_only_when_asked(banner: Banner) -> None:
    without = parse(banner.snippet("en", "/about/", False))
    assert without.find_all("form") == [] and without.find_all(role="dialog") == []
    link = without.find("a", class_="pg-settings-link")
    assert link.attrs["href"] == "/_privacy/settings?next=/about/"
    assert "data-pg-open" in link.attrs and link.all_text() == "Privacy settings"
    with_banner = banner.snippet("en", "/about/", True)
    assert banner.snippet("en", "/about/", False) in with_banner.replace(
        with_banner[with_banner.index(b"<div id=") : with_banner.index(b'<div class="pg-root"')], b""
    )


def test_no_inline_script_style_or_handlers(banner: Banner) -> None:
    for markup in (banner.snippet("en", "/", True), banner.settings_page("en", frozenset(), "/")):
        tree = parse(markup)
        for node in tree.iter():
            assert node.tag != "style"
            assert "style" not in node.attrs
            assert not [a for a in node.attrs if a.startswith("on")], node
            if node.tag == "script":
                assert node.attrs.get("src") and "defer" in node.attrs and not node.all_text().strip()


def test_text_and_config_values_are_escaped() -> None:
    evil = '<script>alert("x")</script>'
    banner = make_banner(
        consent={"category": {"analytics": {"label": evil, "description": f"a & b {evil}"}}},
        site={"privacy_url": '/privacy/?a=1&b="><img src=x>'},
        banner={"texts": {"en": {"title": evil, "body": "'quoted' & <b>"}}},
    )
    markup = banner.snippet("en", '/p/"><script>x</script>', True)
    assert b"<script>alert" not in markup and b"<img" not in markup and b"</script>x" not in markup
    tree = parse(markup)
    assert tree.find("label").all_text() == evil  # shown as text, not run
    assert tree.find("h2").all_text() == evil
    assert tree.find(class_="pg-link").attrs["href"] == '/privacy/?a=1&b="><img src=x>'
    assert [n.tag for n in tree.iter() if n.tag == "script"] == ["script"]  # only ours


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "/"),
        ("/downloads/", "/downloads/"),
        ("/a b/c", "/a%20b/c"),
        ("/café", "/caf%C3%A9"),
        ("/search?q=secret", "/search%3Fq=secret"),  # a decoded "?" is part of the path, never a query
        ("/100%", "/100%25"),
        ("//evil.example/x", "/evil.example/x"),  # scheme-relative: an open redirect
        ("///evil.example", "/evil.example"),
        ("/\\evil.example", "/%5Cevil.example"),
        ('/"><script>', "/%22%3E%3Cscript%3E"),
        ("/a\r\nSet-Cookie: x", "/a%0D%0ASet-Cookie:%20x"),
        ("/user@example.org:8/x;y=1", "/user@example.org:8/x;y=1"),
        ("relative", "/"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("/" + "a" * 5000, "/"),
    ],
)
def test_next_path(path: str, expected: str) -> None:
    assert next_path(path) == expected
    tree = parse(make_banner().snippet("en", path, True))
    assert tree.find("input", name="next").attrs["value"] == expected


def test_query_strings_never_reach_the_markup(banner: Banner) -> None:
    # The middleware passes scope["path"], which has no query; even a path that *looks* like one is encoded.
    markup = banner.snippet("en", "/reset?token=abc123&email=a@b.c", True)
    assert b"?token=" not in markup and b"&email=" not in markup


def test_markup_is_byte_identical_for_everyone_on_a_path() -> None:
    """Cacheability: nothing per visitor or per process (two workers must produce the same bytes)."""
    settings = make_settings(**MULTI)
    one, two = Banner(settings), Banner(settings)
    for language in one.languages:
        for show in (True, False):
            assert one.snippet(language, "/jobs/", show) == two.snippet(language, "/jobs/", show)
    assert one.version == two.version
    assert b"pg-path-" not in one.snippet("en", "/", True)  # the internal placeholder never leaks


def test_version_changes_with_any_text() -> None:
    base = make_banner()
    assert len(base.version) == 64
    assert make_banner(banner={"texts": {"en": {"reject_all": "No thanks"}}}).version != base.version
    assert make_banner(consent={"category": {"analytics": {"label": "Stats"}}}).version != base.version
    assert make_banner(site={"privacy_url": "/legal/"}).version != base.version


# --------------------------------------------------------------------------------------------------- languages


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "en"),
        (b"", "en"),
        (b"de", "de"),
        (b"DE-de", "de"),
        (b"de-CH, fr;q=0.9", "de"),  # per range: de-CH falls back to de before fr is considered
        (b"fr;q=0.5, de;q=0.9", "de"),
        (b"es, fr;q=0.1", "fr"),
        (b"pt-PT", "pt-br"),  # same primary subtag beats the default
        (b"pt", "pt-br"),
        (b"pt-br", "pt-br"),
        (b"*", "en"),
        (b"de;q=0", "en"),  # q=0 means "not acceptable"
        (b"de;q=0, fr", "fr"),
        (b"zz, en;q=0.2, de;q=0.1", "en"),
        (b"de;q=abc, fr;q=0.4", "fr"),
        (b"de;q=1.0001", "en"),
        (b";;;,,,", "en"),
        (b"en-US,en;q=0.9,de;q=0.8", "en"),
        (b"\xff\xfe", "en"),
        (b"x" * 5000, "en"),
    ],
)
def test_language_choice(header: bytes | None, expected: str) -> None:
    assert make_banner(**MULTI).choose_language(header) == expected


def test_language_choice_is_cached_and_bounded() -> None:
    banner = make_banner(**MULTI)
    for i in range(2000):
        assert banner.choose_language(f"de, x-{i}".encode()) == "de"
    cache = banner._chooser._cache
    assert 0 < len(cache) <= 512


def test_default_language_and_single_language() -> None:
    only_english = make_banner()
    assert only_english.languages == ("en",)
    assert only_english.choose_language(b"de") == "en"
    assert only_english.vary == (b"cookie",)
    german_default = make_banner(banner={"default_language": "de", "texts": {"de": {"title": "Ihre Wahl"}}})
    assert german_default.choose_language(None) == "de"
    assert german_default.choose_language(b"ja") == "de"
    assert german_default.choose_language(b"en") == "en"
    assert german_default.vary == (b"cookie", b"accept-language")


def test_parse_accept_language_order() -> None:
    assert parse_accept_language("da, en-gb;q=0.8, en;q=0.7") == ["da", "en-gb", "en"]
    assert parse_accept_language("a;q=0.5, b, c;q=0.5") == ["b", "a", "c"]  # stable for equal weights


def test_per_language_overrides_with_english_fallback() -> None:
    banner = make_banner(**MULTI)
    tree = parse(banner.snippet("de", "/", True))
    assert tree.find(role="dialog").attrs["lang"] == "de"
    assert tree.find("h2").all_text() == "Ihre Wahl"
    assert [b.all_text() for b in tree.find(class_="pg-actions").find_all("button")] == [
        "Alle ablehnen",
        "Alle akzeptieren",
    ]
    assert tree.find("label", for_="pg-category-analytics").all_text() == "Statistik"
    assert tree.find("label", for_="pg-category-marketing").all_text() == "Marketing"  # from [consent.category]
    assert tree.find("summary").all_text() == "Settings"  # not translated: English default
    assert parse(banner.snippet("pt-br", "/", True)).find("h2").all_text() == "Suas escolhas"
    # An unknown language falls back to the default rather than failing the page.
    assert banner.snippet("xx", "/", True) == banner.snippet("en", "/", True)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"banner": {"texts": {"de": {"titel": "x"}}}}, "banner.texts.de.titel"),
        ({"banner": {"texts": {"de": {"reject_all": "  "}}}}, "banner.texts.de.reject_all"),
        ({"banner": {"texts": {"de": {"newsletter_label": "x"}}}}, "banner.texts.de.newsletter_label"),
        ({"banner": {"texts": {"not a tag!": {"title": "x"}}}}, "banner.texts.not a tag!"),
        ({"banner": {"default_language": "fr"}}, "banner.default_language"),
        ({"site": {"privacy_url": "javascript:alert(1)"}}, "site.privacy_url"),
        ({"site": {"privacy_url": "//evil.example/"}}, "site.privacy_url"),
        ({"site": {"privacy_url": "privacy.html"}}, "site.privacy_url"),
    ],
)
def test_bad_banner_configuration_fails_at_startup(overrides: Mapping[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_banner(**overrides)
    assert info.value.key == key


def test_category_text_fallbacks() -> None:
    banner = make_banner(consent={"categories": ["analytics", "third_party"]})
    tree = parse(banner.snippet("en", "/", True))
    assert tree.find("label", for_="pg-category-third_party").all_text() == "Third party"
    assert tree.find_all(id="pg-category-third_party-description") == []  # no empty description element
    assert "aria-describedby" not in tree.find("input", value="third_party").attrs


# ------------------------------------------------------------------------------------------------ settings page


def test_settings_page_is_a_full_document_reflecting_the_choice(banner: Banner) -> None:
    page = banner.settings_page("en", frozenset({"analytics", "not-configured"}), "/jobs/?x=1")
    assert page.startswith(b'<!DOCTYPE html>\n<html lang="en">')
    tree = parse(page)
    check_references(tree)
    assert tree.find("title").all_text() == "Privacy settings"
    assert tree.find("h1").all_text() == "Privacy settings"
    assert "open" in tree.find("details").attrs
    assert "checked" in tree.find("input", value="analytics").attrs
    assert tree.find("input", name="next").attrs["value"] == "/jobs/%3Fx=1"
    assert tree.find("a", class_="pg-link", href="/jobs/%3Fx=1").all_text() == "Back to the page"
    panel = tree.find(id="pg-banner")
    assert panel.attrs["role"] == "region" and "data-pg-standalone" in panel.attrs
    unchecked = parse(banner.settings_page("en", frozenset(), "//evil.example"))
    assert "checked" not in unchecked.find("input", value="analytics").attrs
    assert unchecked.find("input", name="next").attrs["value"] == "/evil.example"


def test_settings_page_language() -> None:
    page = make_banner(**MULTI).settings_page("de", frozenset(), "/")
    assert b'<html lang="de">' in page and b"Alle ablehnen" in page


# ------------------------------------------------------------------------------------------------------ assets


def asset_app(banner: Banner) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await banner.serve_asset(scope, receive, send, scope["path"].lstrip("/"))

    return app


def package_file(name: str) -> bytes:
    return importlib.resources.files("gateway.banner").joinpath(name).read_bytes()


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "content_type"), [("banner.css", "text/css"), ("banner.js", "text/javascript")])
async def test_assets_are_cacheable_with_etag_and_304(banner: Banner, name: str, content_type: str) -> None:
    transport = httpx.ASGITransport(app=asset_app(banner))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        first = await client.get(f"/{name}")
        assert first.status_code == 200
        assert first.content == package_file(name)
        assert first.headers["content-type"] == f"{content_type}; charset=utf-8"
        assert first.headers["cache-control"] == "public, max-age=86400"
        assert first.headers["x-content-type-options"] == "nosniff"
        etag = first.headers["etag"]
        assert etag == '"' + hashlib.sha256(first.content).hexdigest()[:32] + '"'

        for if_none_match in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
            again = await client.get(f"/{name}", headers={"if-none-match": if_none_match})
            assert again.status_code == 304, if_none_match
            assert again.content == b""
            assert again.headers["etag"] == etag and again.headers["cache-control"] == "public, max-age=86400"

        stale = await client.get(f"/{name}", headers={"if-none-match": '"older"'})
        assert stale.status_code == 200 and stale.content == first.content

        head = await client.head(f"/{name}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(first.content))

        post = await client.post(f"/{name}")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


@pytest.mark.anyio
async def test_unknown_asset_is_404(banner: Banner) -> None:
    transport = httpx.ASGITransport(app=asset_app(banner))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for name in ("banner.html", "../config.py", "inject.py", ""):
            assert (await client.get(f"/{name}")).status_code == 404


def test_asset_urls_change_with_the_files(banner: Banner) -> None:
    tree = parse(banner.snippet("en", "/", False))
    version = tree.find("link").attr("href").split("?v=")[1]
    assert tree.find("script").attr("src").endswith(f"?v={version}")
    expected = hashlib.sha256(package_file("banner.css") + package_file("banner.js")).hexdigest()[:12]
    assert version == expected


# ----------------------------------------------------------------------------------------- static asset checks


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_script_is_valid_javascript() -> None:
    path = importlib.resources.files("gateway.banner").joinpath("banner.js")
    subprocess.run(["node", "--check", str(path)], check=True, capture_output=True, timeout=30)


def test_script_and_stylesheet_keep_their_promises() -> None:
    js = package_file("banner.js").decode()
    css = re.sub(r"/\*.*?\*/", "", package_file("banner.css").decode(), flags=re.DOTALL)
    assert "document.cookie" not in js  # consent state comes from the server, the cookie is HttpOnly
    assert "eval(" not in js and "innerHTML" not in js and "new Function" not in js
    assert '"Escape"' in js
    assert "prefers-reduced-motion" in css and ":focus-visible" in css and "forced-colors" in css
    # Accept and Reject are styled by one shared class, never one each.
    assert ".pg-choice" in css and "reject" not in css.lower() and "accept" not in css.lower()
