"""Checks that keep the docs site honest.

- every public name exported by ``hypergrad`` (recursively through its public submodules) has a
  docstring with an ``Examples:`` section;
- every public module has an API reference page that is in the site's navigation;
- the README's first ``python`` block runs;
- a code block that raises fails ``mkdocs build --strict`` (so a broken tutorial fails CI).

Import-driven: a name or module added to an ``__all__`` is covered without editing this file.
"""

from __future__ import annotations

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
