"""The README and the pages of docs/ are tested, so that they cannot rot.

- Every ```python block runs: each page's blocks in order, in one namespace, as a reader would
  paste them (on a CPU, in seconds). A python block that cannot run here says so in its fence,
  ```python skip="why", and shows as a skipped test with that reason (it must still compile).
  Other fences (```bash, ```text, ```toml, ```yaml; no other kinds) are not run.
- Every relative link (and image) points at a file that exists, and a link to a heading
  (page.md#heading) at a heading that exists.
- Every page of docs/ is linked from the README, and the README stays at most 250 lines.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\S*)(.*)$")
SKIP = re.compile(r'skip="([^"]+)"')


def blocks(page):
    """The fenced blocks of ``page``: (language, info after it, first line number, source)."""
    out, lang, info, start, lines = [], None, "", 0, []
    for i, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if lang is None and m:
            lang, info, start, lines = m.group(1) or "text", m.group(2).strip(), i + 1, []
        elif lang is not None and line.startswith("```"):
            out.append((lang, info, start, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"{page.name}: a fence opened at line {start - 1} is never closed"
    return out


def name(page):
    return str(page.relative_to(ROOT))


def python_blocks(page):
    return [(start, info, src) for lang, info, start, src in blocks(page) if lang == "python"]


def skipped_blocks():
    """(page, line, reason) of every python block marked skip="reason"."""
    return [(page, start, SKIP.search(info).group(1), src)
            for page in PAGES for start, info, src in python_blocks(page) if SKIP.search(info)]


SAMPLE_MODULE = "docs_sample_"  # the __name__ a page's samples run under


def compile_at(page, start, src):
    """Compile a block so that a traceback names the page and the page's own line numbers."""
    return compile("\n" * (start - 1) + src, name(page), "exec")


@pytest.fixture
def registry_restored():
    """A page may register its own implementations; they are unregistered once it has run. (What an
    import registers, an adapter module say, stays: the module stays imported too.)"""
    import impls

    yield
    for f in impls.FAMILIES.values():
        for key, entry in list(f.registry.items()):
            if entry.module.startswith(SAMPLE_MODULE):
                del f.registry[key]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=name)
def test_code_samples_run(page, registry_restored, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a sample that writes files writes them here
    namespace = {"__name__": SAMPLE_MODULE + page.stem.replace("-", "_")}
    for start, info, src in python_blocks(page):
        if SKIP.search(info):
            continue
        exec(compile_at(page, start, src), namespace)


@pytest.mark.parametrize("page, line, reason, src", skipped_blocks(),
                         ids=[f"{name(p)}:{line}" for p, line, _, _ in skipped_blocks()])
def test_code_samples_not_run_here(page, line, reason, src):
    compile_at(page, line, src)
    pytest.skip(f"{name(page)}, python block at line {line}: {reason}")


NOT_RUN = ("bash", "text", "toml", "yaml")  # fences shown, never run


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_fence_is_python_or_a_kind_not_run(page):
    """A sample fenced ```py or ```python3 would silently never run: every fence says python or one
    of the kinds that are shown only."""
    odd = [f"line {start - 1}: ```{lang}" for lang, _, start, _ in blocks(page) if lang not in ("python", *NOT_RUN)]
    assert not odd, f"{name(page)}: fences neither run nor known as not run: {', '.join(odd)}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def links(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links, not code
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_point_at_files_that_exist(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{name(page)}: broken links: {', '.join(broken)}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme)}
    missing = [name(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {', '.join(missing)}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md is {lines} lines; at most {README_MAX_LINES}: move depth to docs/"
