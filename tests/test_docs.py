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


def test_the_package_map_in_design_names_existing_modules():
    design = page_text(ROOT / "docs" / "DESIGN.md")
    tree = design[design.index("```\ndualpath/") + 4 : design.index("```", design.index("```\ndualpath/") + 4)]
    for line in tree.splitlines()[1:]:
        entry = line.strip().split()[0] if line.strip() else ""
        if entry.endswith("/") and entry not in ("tests/", "examples/", "docs/"):
            for d in entry.split(","):
                d = d.strip().rstrip("/")
                if d:
                    assert (ROOT / "dualpath" / d).is_dir(), f"DESIGN.md's map names dualpath/{d}/"
        for module in re.findall(r"\b(\w+\.py)\b", line):
            assert list((ROOT / "dualpath").rglob(module)), f"DESIGN.md's map names {module}"


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
