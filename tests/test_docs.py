"""The front page and the documentation pages: short, linked correctly, and complete against the registries.

The pages' own links, anchors and API references are checked by ``mkdocs build --strict`` (scripts/test.sh);
these tests cover README.md, which lives outside the site, and what the pages must name: every
``lmms-prune`` command, model family and preset, read from the package's own registries.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import markdown
import pytest

from lmms_prune.cli.main import build_parser
from lmms_prune.families import FAMILIES
from lmms_prune.methods import PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 150


class _Collect(HTMLParser):
    """Link targets (``<a href>``, ``<img src>``) and heading texts of one rendered page."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.headings: list[str] = []
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "a" and found.get("href"):
            self.targets.append(found["href"])
        elif tag == "img" and found.get("src"):
            self.targets.append(found["src"])
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = []

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading.append(data)

    def handle_endtag(self, tag: str) -> None:
        if re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None


def _parse(path: Path) -> _Collect:
    """The page rendered by Python-Markdown (what mkdocs uses; code blocks and code spans hold no links)."""
    collect = _Collect()
    collect.feed(markdown.markdown(path.read_text(encoding="utf-8"), extensions=["tables"]))
    return collect


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (hyphens and underscores stay), each space
    a hyphen."""
    text = unicodedata.normalize("NFKC", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file, GitHub's way; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _parse(path).headings:
        slug = github_anchor(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def relative_links(path: Path) -> list[str]:
    """The links of ``path`` into the repository (no scheme, no host; e-mail and web links left out)."""
    return [t for t in _parse(path).targets if not urlsplit(t).scheme and not urlsplit(t).netloc]


def unresolved(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``path`` whose file (inside ``root``), or whose anchor in a Markdown file, does not
    exist."""
    bad = []
    for link in relative_links(path):
        parts = urlsplit(link)
        target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        if root not in (target, *target.parents):
            bad.append(f"{link}: {target} is outside the repository")
        elif not target.exists():
            bad.append(f"{link}: no file {target}")
        elif parts.fragment and (target.suffix != ".md" or unquote(parts.fragment) not in anchors(target)):
            bad.append(f"{link}: no heading with anchor #{parts.fragment} in {target.name}")
    return bad


def code_spans(path: Path) -> set[str]:
    """The text of every inline code span of a Markdown file."""
    return set(re.findall(r"`([^`\n]+)`", path.read_text(encoding="utf-8")))


def commands() -> list[str]:
    """The sub-commands `lmms-prune --help` lists, from the parser itself."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


# ------------------------------------------------------------------------------------------------ the checks
def test_checker_finds_broken_links_and_anchors(tmp_path):
    """The link checker itself: a good file and anchor pass; a missing file, a missing anchor, an anchor of a
    repeated heading beyond its count and a file outside the repository are reported; web links and code are
    not links."""
    (tmp_path.parent / f"{tmp_path.name}_outside.md").write_text("# Outside\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Set `x`: up (1)\n\n## Again\n\n## Again\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md) [anchor](docs/page.md#set-x-up-1) [dup](docs/page.md#again-1)\n"
        "[web](https://example.org/none.md) `[code](missing.md)`\n\n"
        "    [indented code](missing_too.md)\n\n"
        "[gone](docs/gone.md) [no anchor](docs/page.md#nothing) [too many](docs/page.md#again-2)\n"
        f"[outside](../{tmp_path.name}_outside.md)\n"
    )
    bad = unresolved(readme.resolve(), root=tmp_path.resolve())
    assert [b.split(":")[0] for b in bad] == ["docs/gone.md", "docs/page.md#nothing", "docs/page.md#again-2",
                                           f"../{tmp_path.name}_outside.md"]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/ pages"


def test_readme_links_resolve():
    links = relative_links(README)
    assert any(link.startswith("docs/") for link in links)
    assert unresolved(README) == []


def test_readme_names_the_two_commands_and_their_scripts_exist():
    text = README.read_text(encoding="utf-8")
    for line in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert line in text
    for script in re.findall(r"bash (scripts/\S+\.sh)", text):
        assert (ROOT / script).is_file(), script


@pytest.mark.parametrize("registry", ["commands", "families", "presets"])
def test_every_registered_name_is_documented(registry):
    """Each command, family and preset is in the README's at-a-glance lists and on its reference page."""
    names, page, form = {
        "commands": (commands(), DOCS / "cli.md", "lmms-prune {}"),
        "families": (list(FAMILIES), DOCS / "families.md", "{}"),
        "presets": (list(PRESETS), DOCS / "methods.md", "{}"),
    }[registry]
    assert names
    readme, reference = code_spans(README), code_spans(page)
    missing_readme = [n for n in names if n not in readme]
    missing_page = [n for n in names if not any(s == form.format(n) or s.startswith(form.format(n) + " ")
                                                for s in reference)]
    assert missing_readme == [], f"README.md does not name these {registry}: {missing_readme}"
    assert missing_page == [], f"{page.name} does not name these {registry}: {missing_page}"
