"""Checks that keep the docs site honest.

- every public name exported by ``hypergrad`` (recursively through its public submodules) has a
  docstring with an ``Examples:`` section;
- every public module has an API reference page that is in the site's navigation;
- the README's first ``python`` block runs;
- a code block that raises fails ``mkdocs build --strict`` (so a broken tutorial fails CI).
- the built site shows no markup as literal text: no Sphinx roles (``:func:`` and friends, which
  mkdocstrings does not understand; write ``[`name`][hypergrad.full.path]``) and no Markdown
  that reached the page unrendered (``## heading``, ``**bold**``, ``| --- |`` table rows).

Import-driven: a name or module added to an ``__all__`` is covered without editing this file.
"""

from __future__ import annotations

import html.parser
import inspect
import pathlib
import re
import subprocess
import sys
import types

import pytest

import hypergrad

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _public_modules() -> list[types.ModuleType]:
    """``hypergrad`` and every module reachable through the ``__all__`` of a public module."""
    found: dict[str, types.ModuleType] = {}
    todo = [hypergrad]
    while todo:
        module = todo.pop()
        if module.__name__ in found:
            continue
        found[module.__name__] = module
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if isinstance(value, types.ModuleType) and value.__name__.startswith("hypergrad"):
                todo.append(value)
    return sorted(found.values(), key=lambda m: m.__name__)


def _public_objects() -> dict[str, object]:
    """Every function and class exported by a public module (its ``__all__``).

    Keyed by the name a user writes (``hypergrad.tree.add``). Values defined outside hypergrad
    (``typing.Any`` behind a type alias, re-exported torch functions) are not ours to document.
    """
    objects: dict[str, object] = {}
    for module in _public_modules():
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, types.ModuleType) or not callable(value):
                continue
            if not getattr(value, "__module__", "").startswith("hypergrad"):
                continue
            objects[f"{module.__name__}.{name}"] = value
    return objects


PUBLIC_OBJECTS = _public_objects()


def test_the_public_api_is_found() -> None:
    assert "hypergrad.tree.map" in PUBLIC_OBJECTS
    assert "hypergrad.optim" in {m.__name__ for m in _public_modules()}


@pytest.mark.parametrize("name", sorted(PUBLIC_OBJECTS))
def test_public_name_has_docstring_with_examples(name: str) -> None:
    doc = inspect.getdoc(PUBLIC_OBJECTS[name]) or ""
    assert doc.strip(), f"{name} has no docstring"
    assert re.search(r"^Examples:\s*$", doc, re.M), (
        f"{name}: the docstring has no 'Examples:' section; add a short runnable example "
        "(it is run as a doctest)."
    )


def _nav_pages() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") :]
    return set(re.findall(r"([\w./-]+\.md)\s*$", nav, re.M))


def _documented_modules() -> set[str]:
    documented = set()
    for page in _nav_pages():
        if page.startswith("api/"):
            text = (DOCS / page).read_text()
            documented |= set(re.findall(r"^::: (hypergrad[\w.]*)\s*$", text, re.M))
    return documented


@pytest.mark.parametrize("module", [m.__name__ for m in _public_modules()])
def test_public_module_has_an_api_page_in_the_nav(module: str) -> None:
    assert module in _documented_modules(), (
        f"{module} is public but no page under docs/api/ in mkdocs.yml's nav renders it; add "
        f"docs/api/<name>.md containing '::: {module}' and list it under 'API reference'."
    )


def test_every_nav_page_exists() -> None:
    missing = sorted(p for p in _nav_pages() if not (DOCS / p).is_file())
    assert not missing, f"mkdocs.yml's nav lists pages that do not exist: {missing}"


def _readme_example() -> str | None:
    match = re.search(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    return match.group(1) if match else None


def test_readme_example_runs() -> None:
    code = _readme_example()
    assert code is not None, "README.md must show a ```python example (the 30-line quick start)"
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("flags", [["--strict"], ["-q"]], ids=["strict", "quiet"])
def test_a_failing_code_block_fails_the_build(tmp_path: pathlib.Path, flags: list[str]) -> None:
    """The site's own configuration (hooks, plugins), with one page whose code block raises."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(
        '# t\n\n```python exec="on"\nraise ValueError("tutorial broke")\n```\n'
    )
    config = (ROOT / "mkdocs.yml").read_text()
    config = config[: config.index("\nnav:")] + "\nnav:\n  - index.md\n"
    config = config.replace("docs/hooks.py", str(DOCS / "hooks.py"))
    config = config.replace("paths: [src]", f"paths: [{ROOT / 'src'}]")
    config = re.sub(r"\nwatch:\n(  - .*\n)+", "\n", config)
    (tmp_path / "mkdocs.yml").write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "executed code block(s) failed" in result.stdout + result.stderr or "--strict" in flags
    assert "tutorial broke" in result.stdout + result.stderr or "-q" in flags


# -- the built site, as a browser shows it ---------------------------------------------------------

_ROLE = re.compile(r":(func|class|mod|meth|attr|obj|data|exc):`")
_RAW_MARKDOWN = {
    "a Markdown heading": re.compile(r"^[ \t]*#{1,6} \S", re.M),
    "Markdown bold": re.compile(r"\*\*\w[^*\n]*\*\*"),
    "a Markdown table row": re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*\|", re.M),
}
# A Markdown table (a header row, then its separator row) printed into a code block: the output of
# a markdown-exec block shown as text instead of rendered.
_TABLE_IN_PRE = re.compile(r"^[ \t]*\|.*\|[ \t]*\n[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*\|", re.M)


class _VisibleText(html.parser.HTMLParser):
    """The text a reader sees outside code; each ``<code>`` element is shown as a backtick.

    A Sphinx role renders as ``:func:<code>name</code>``, which becomes ``:func:`` followed by a
    backtick here, as in the docstring's source. The text of each ``<pre>`` is kept apart.
    """

    _SKIP = frozenset({"pre", "code", "script", "style", "textarea", "svg"})
    _VOID = frozenset({"area", "br", "col", "embed", "hr", "img", "input", "link", "meta", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.parts: list[str] = []
        self.pre: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._VOID:
            return
        if tag == "code" and not self._skipping():
            self.parts.append("`")
        if tag == "pre" and "pre" not in self.open:
            self.pre.append("")
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.open:
            while self.open.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if not self._skipping():
            self.parts.append(data)
        elif "pre" in self.open:
            self.pre[-1] += data

    def _skipping(self) -> bool:
        return any(tag in self._SKIP for tag in self.open)


def rendering_problems(page_html: str) -> list[str]:
    """Markup shown as literal text in one built page: Sphinx roles and unrendered Markdown."""
    parser = _VisibleText()
    parser.feed(page_html)
    parser.close()
    text = "".join(parser.parts)
    problems = []
    for match in _ROLE.finditer(text):
        context = text[match.start() : match.start() + 60].split("\n")[0]
        problems.append(f"a Sphinx role shown as text: {context!r}")
    for what, pattern in _RAW_MARKDOWN.items():
        for match in pattern.finditer(text):
            problems.append(f"{what} shown as text: {match.group(0).strip()[:60]!r}")
    for block in parser.pre:
        if match := _TABLE_IN_PRE.search(block):
            problems.append(f"a Markdown table in a code block: {match.group(0).strip()[:60]!r}")
    return problems


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("<p>See :func:<code>hypergrad.unroll</code> and :class:<code>Trajectory</code>.</p>", 2),
        ("<p>:mod:`hypergrad.unroll` kept its backticks</p>", 1),
        ("<div><pre><code>## clients\n- **rows**: 3\n|---|---|</code></pre></div>", 0),
        ("<pre><code>**rows**\n\n| mode | peak |\n|---|---|\n| vmap | 17.6 |</code></pre>", 1),
        ("<p>## clients</p><p>**rows**</p><p>| a | b |\n|---|---|\n| 1 | 2 |</p>", 3),
        ("<h2>clients</h2><p><strong>rows</strong></p><table><tr><td>1</td></tr></table>", 0),
        ('<p>See <a href="#x"><code>hg.unroll</code></a>: <code>x ** 2</code>, a*b.</p>', 0),
    ],
    ids=[
        "roles",
        "role-with-backticks",
        "inside-pre",
        "table-in-pre",
        "raw-markdown",
        "rendered",
        "clean",
    ],
)
def test_rendering_problems_finds_literal_markup(page: str, expected: int) -> None:
    assert len(rendering_problems(page)) == expected, rendering_problems(page)


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The whole site, built once per test session (``mkdocs build --strict``: no warnings)."""
    site = tmp_path_factory.mktemp("docs") / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    return site


def test_built_pages_show_no_literal_markup(built_site: pathlib.Path) -> None:
    pages = sorted(built_site.rglob("*.html"))
    assert len(pages) > 10, f"the build wrote only {len(pages)} pages"
    problems = [
        f"{page.relative_to(built_site)}: {problem}"
        for page in pages
        for problem in rendering_problems(page.read_text(encoding="utf-8"))
    ]
    assert not problems, (
        "The built site shows markup as literal text (a Sphinx role: write "
        "[`name`][hypergrad.full.path] instead; Markdown: check how the page produces it):\n  "
        + "\n  ".join(problems[:40])
        + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
    )


# ------------------------------------------------------------------ attributes the docs name

_RESULT = re.compile(r"\b(\w+) = hg\.(?:clients\.)?hypergrad\(")
_TRAJ = re.compile(r"\b(\w+) = hg\.(?:clients\.)?unroll\(")


def _named_attributes(text: str) -> list[tuple[str, str, list[str]]]:
    """``(kind, name, [attr, ...])`` for each ``g.attr`` / ``traj.attr`` chain in ``text``.

    ``g`` (and any name bound to ``hg.hypergrad(...)``) is a ``Hypergradient``; ``traj`` (and any
    name bound to ``hg.unroll(...)``) a ``Trajectory``. A name bound otherwise on the same line
    (``lambda g: g.pow(2)``) is skipped.
    """
    kinds = {"g": "result", "traj": "traj"}
    kinds.update({m: "result" for m in _RESULT.findall(text)})
    kinds.update({m: "traj" for m in _TRAJ.findall(text)})
    found = []
    pattern = re.compile(rf"\b({'|'.join(map(re.escape, kinds))})((?:\.[A-Za-z_]\w*)+)")
    for line in text.splitlines():
        for match in pattern.finditer(line):
            name, chain = match.group(1), match.group(2).split(".")[1:]
            if re.search(rf"\b(lambda|for|def)\b[^:]*\b{re.escape(name)}\b", line):
                continue
            if line[: match.start()].endswith((".", "hg.")):  # hg.g? a module path
                continue
            found.append((kinds[name], name, chain))
    return found


def _doc_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_every_result_attribute_the_docs_name_exists() -> None:
    fields = {
        "result": set(hypergrad.Hypergradient._fields),
        "traj": set(hypergrad.Trajectory._fields),
        "trajectory": set(hypergrad.Trajectory._fields),
        "solver": set(hypergrad.ImplicitReport._fields),
    }
    seen, wrong = 0, []
    for path in _doc_files():
        for kind, name, chain in _named_attributes(path.read_text()):
            owner = kind
            for attr in chain:
                if owner not in fields:
                    break  # a tensor's or a dict's own attribute (g.aux.shape)
                seen += 1
                if attr not in fields[owner]:
                    wrong.append(f"{path.relative_to(ROOT)}: {name}.{'.'.join(chain)}")
                    break
                owner = attr
    assert seen > 20  # the scan finds the docs' results
    assert not wrong, f"attributes the results do not have: {wrong}"


def test_named_attributes_finds_chains() -> None:
    text = (
        "g = hg.hypergrad(...)\ng.trajectory.params\nr = hg.unroll(x)\nr.losses\nlambda g: g.pow(2)"
    )
    assert _named_attributes(text) == [
        ("result", "g", ["trajectory", "params"]),
        ("traj", "r", ["losses"]),
    ]
