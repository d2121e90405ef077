"""The docs name only what exists: modules, `dualpath` commands and config keys.

A page that describes a module, a command or a config key the code does not have misleads the
readers this project is for; these checks fail the moment the two drift apart."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from dualpath.cli import main
from dualpath.config import ClusterConfig

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = {name: t for name, t in typing.get_type_hints(ClusterConfig).items() if name != "engines"}


def page_text(page: Path) -> str:
    return page.read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_module_path_a_page_names_exists(page):
    for path in re.findall(r"`((?:dualpath|tests|examples|docs|runs)/[\w./-]*)`", page_text(page)):
        if "*" not in path:
            assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def package_map() -> dict[str, str]:
    """DESIGN.md §4's package map: the text of each entry, keyed by package ("" for dualpath/ itself).

    An entry starts at two spaces' indent (`  cli.py ...` or `  engine/ ...`); deeper lines
    continue it. A module counts as named when its file name (`runtime.py`) is in its entry."""
    design = page_text(ROOT / "docs" / "DESIGN.md")
    section = design[design.index("## 4.") :]
    start = section.index("```\ndualpath/") + 4
    tree = section[start : section.index("```", start)]
    entries: dict[str, str] = {}
    current = ""
    for line in tree.splitlines()[1:]:
        if not line.strip():
            continue
        if re.match(r"^  \S", line):
            first = line.split()[0]
            if first in ("tests/", "examples/", "docs/"):
                break
            current = first.rstrip("/") if first.endswith("/") else ""
        entries[current] = entries.get(current, "") + line + "\n"
    return entries


def modules_on_disk() -> dict[str, set[str]]:
    """Every dualpath/<module>.py and dualpath/<pkg>/<module>.py except __init__.py, by package."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "dualpath").rglob("*.py"):
        rel = path.relative_to(ROOT / "dualpath")
        if path.name == "__init__.py" or "__pycache__" in rel.parts:
            continue
        found.setdefault(rel.parts[0] if len(rel.parts) > 1 else "", set()).add(path.name)
    return found


def modules_named(entry: str) -> set[str]:
    return set(re.findall(r"\b(\w+\.py)\b", entry))


def test_the_package_map_in_design_names_only_existing_packages_and_modules():
    entries = package_map()
    assert "" in entries and "engine" in entries, "DESIGN.md §4's package map was not found"
    for pkg, entry in entries.items():
        where = ROOT / "dualpath" / pkg
        assert where.is_dir(), f"DESIGN.md's map names dualpath/{pkg}/, which does not exist"
        for module in modules_named(entry):
            assert (where / module).is_file(), (
                f"DESIGN.md's map names {module} under dualpath/{pkg + '/' if pkg else ''}, "
                "which has no such module"
            )


def test_the_package_map_in_design_names_every_package():
    entries = package_map()
    packages = {p.name for p in (ROOT / "dualpath").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(entries), f"DESIGN.md's map omits packages {sorted(packages - set(entries))}"


def unnamed_modules() -> list[str]:
    entries = package_map()
    return sorted(
        f"dualpath/{pkg + '/' if pkg else ''}{module}"
        for pkg, modules in modules_on_disk().items()
        for module in modules - modules_named(entries.get(pkg, ""))
    )


def test_the_package_map_in_design_names_every_module():
    missing = unnamed_modules()
    assert not missing, f"DESIGN.md's package map does not name: {', '.join(missing)}"


def test_the_readme_reading_order_names_only_existing_files():
    readme = page_text(ROOT / "README.md")
    start = readme.index("## Reading order")
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end != -1 else None]
    named = [
        p for p in re.findall(r"`([\w./-]+)`", section) if p.endswith((".py", "/")) and "/" in p
    ]
    assert len(named) >= 8, "the README's reading order names fewer files than expected: was it moved?"
    for path in named:
        target = ROOT / path if path.startswith("dualpath/") else ROOT / "dualpath" / path
        assert target.exists(), f"the README's reading order names {path}, which does not exist"


def cited_runs(page: Path) -> list[str]:
    """The `runs/...` paths a page cites, outside fenced code (a command there names where it
    would write, not a file the page relies on)."""
    prose = re.sub(r"```.*?```", "", page_text(page), flags=re.S)
    return sorted({m.rstrip(".,;:)") for m in re.findall(r"runs/[\w.*/-]+", prose)})


def test_every_runs_path_results_cites_exists():
    cited = cited_runs(ROOT / "docs" / "RESULTS.md")
    assert cited, "docs/RESULTS.md cites no runs/ file"
    missing = [p for p in cited if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, f"docs/RESULTS.md cites files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_dualpath_command_a_page_names_exists(page):
    for words in re.findall(r"`dualpath ((?:[a-z][\w-]* ?)+)", page_text(page)):
        cmd, *rest = words.split()
        assert cmd in main.commands, f"{page.name} names `dualpath {cmd}`"
        group = main.commands[cmd]
        if rest and hasattr(group, "commands") and not rest[0].startswith("-"):
            assert rest[0] in group.commands, f"{page.name} names `dualpath {cmd} {rest[0]}`"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_key_a_page_names_exists(page):
    for section, key in re.findall(rf"`({'|'.join(SECTIONS)})\.(\w+)`", page_text(page)):
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert key in fields, f"{page.name} names config key {section}.{key}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_to_a_section_of_a_page_finds_its_heading(page):
    for target, anchor in re.findall(r"\]\(([\w./-]*\.md)#([\w-]+)\)", page_text(page)):
        linked = (page.parent / target).resolve()
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        headings = {slug(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)}
        assert anchor in headings, f"{page.name} links to {target}#{anchor}, which has no such heading"
