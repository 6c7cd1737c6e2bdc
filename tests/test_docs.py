"""The manual: README.md and docs/ name what the program really has.

Commands and flags come from the real argument parser, settings from the
real validation table, so a command, flag or setting added without its
documentation fails here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from serve_image.cli import build_parser
from serve_image.settings import KNOWN_CONSTANTS

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MANUAL = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_the_readme_is_a_short_manual() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert "scripts/demo" in text and "scripts/test" in text
    # No run logs: no dates, no issue numbers.
    assert re.search(r"\b\d{4}-\d{2}-\d{2}\b", text) is None
    assert re.search(r"(?<![\w/])#\d+\b|\bissue\b", text, re.IGNORECASE) is None


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_and_flag_is_in_docs_cli(command: str) -> None:
    text = (REPO / "docs" / "cli.md").read_text()
    assert f"`{command}`" in text or f"serve-image {command} " in text
    for action in _commands()[command]._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert flag in text, f"{command} {flag}"


def test_every_setting_is_in_docs_configuration() -> None:
    table = (REPO / "docs" / "configuration.md").read_text()
    missing = [name for name in KNOWN_CONSTANTS if f"| `{name}` |" not in table]
    assert missing == []


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_documents_lead_somewhere() -> None:
    checked = 0
    for doc in MANUAL:
        for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", link):
                continue  # an outside address
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            assert target.exists(), f"{doc.name}: {link}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", target.read_text(), re.MULTILINE)
                assert anchor in {_anchor(h) for h in headings}, f"{doc.name}: {link}"
            checked += 1
    assert checked > 20  # the search finds the links
