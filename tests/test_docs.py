"""The docs a newcomer reads: every relative link and every `docs/*.md` mentioned in the
README, the docs pages and the sample folders' READMEs points at a file that exists, and
every `text2mask ...` command in their code blocks names a real command whose --help runs
cleanly (exit 0, no traceback)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "samples").glob("*/README.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MENTION = re.compile(r"(?<![\w/.])(docs/[\w.-]+\.md)")


def _links(page: Path):
    text = page.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue                                     # URLs, mailto:, in-page anchors
        yield target.split("#")[0], page.parent / target.split("#")[0]
    for mention in MENTION.findall(text):
        yield mention, ROOT / mention


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_that_exist(page):
    broken = sorted({t for t, path in _links(page) if not path.exists()})
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def _blocks(text: str):
    """The contents of the fenced code blocks of a markdown text (``` opens and closes)."""
    block = None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block = []
            else:
                yield "\n".join(block)
                block = None
        elif block is not None:
            block.append(line)


def _commands():
    for page in PAGES:
        for block in _blocks(page.read_text(encoding="utf-8")):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.strip()
                for part in re.split(r"&&|\|", line):
                    part = part.strip()
                    if part.startswith(("text2mask ", "python -m text2mask ")):
                        yield page, part


COMMANDS = sorted({(str(p.relative_to(ROOT)), c) for p, c in _commands()})


def _command_path(line: str) -> list[str]:
    from text2mask.cli import app

    words = shlex.split(line.split("#")[0], posix=True)
    words = words[3:] if words[:3] == ["python", "-m", "text2mask"] else words[1:]
    group, path = typer.main.get_command(app), []
    for w in words:
        sub = getattr(group, "commands", {}).get(w)
        if sub is None:
            break
        path.append(w)
        group = sub
    return path


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20 and len({_command_path(c)[0] for _, c in COMMANDS if _command_path(c)}) > 6


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_documented_command_exists_and_its_help_runs(page, line):
    from text2mask.cli import app

    path = _command_path(line)
    words = shlex.split(line.split("#")[0])
    first = words[3] if words[0] == "python" else words[1]
    if first.startswith("-"):                          # `text2mask --help`, `text2mask -v generate ...`
        path = _command_path(" ".join(["text2mask", *[w for w in words[1:] if not w.startswith("-")]]))
    assert path, f"{page}: `{line}` names no text2mask command"
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0 and "Traceback" not in res.output, (page, line, res.output[-2000:])


def _all_commands():
    from text2mask.cli import app

    def walk(cmd, path):
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p) or "text2mask")
def test_every_help_names_the_exit_codes_and_shows_no_bool_metavar(path):
    from text2mask.cli import app

    res = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.replace("│", " ").split())
    assert "Exit codes: 0 done; 1 some items failed" in flat and "130 interrupted" in flat, flat[-400:]
    assert "<bool>" not in res.output and "BOOLEAN" not in res.output
