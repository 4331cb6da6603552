"""The documentation names only what exists: every `make` target, `llmgrpc` command and flag, and
setting (an ``LLMGRPC_*`` variable or a field of the settings object) that README.md and
docs/*.md name is checked against the Makefile, the CLI's parser and ``Settings``.

Names are taken from code (fenced blocks and inline spans), where the docs give commands and
names, never from prose.
"""

from __future__ import annotations

import argparse
import re
from functools import cache
from pathlib import Path

import pytest

from llmgrpc.server.cli import build_parser
from llmgrpc.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where the code that reads an LLMGRPC_* variable lives (tests excluded: a test naming a variable
# does not make it exist).
SOURCES = ["Makefile", ".ci", "deploy", "server", "worker", "engines", "clients", "benchmarks", "protos"]
SOURCE_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".env", ".conf", ""}
# Other programs' flags that the docs quote on their own (not llmgrpc's), with their program.
OTHER_PROGRAMS_FLAGS = {
    "--interrupt_requests": "llama.cpp's server (xllamacpp), in the benchmark report",
    "--profile": "benchmarks/gpu_decode.py, in the GPU check report",
    "--resources": "ray start, in multi-node.md",
    "--model-path": "smg, the model gateway",
}

FENCE = re.compile(r"^\s*```")
INLINE = re.compile(r"`([^`]+)`")
# `make TARGET`, after any VAR=value words.
MAKE = re.compile(r"(?<![\w./-])make\s+(?:[A-Z][A-Z0-9_]*=\S*\s+)*([a-z][\w.-]*)")
# A command at the start of a line of code: optional VAR=value words, then the program.
ENVIRONMENT = r"(?:[A-Z][A-Z0-9_]*=(?:'[^']*'|\"(?:[^\"\\]|\\.)*\"|\S*)\s+)*"
LLMGRPC = re.compile(r"^\s*" + ENVIRONMENT + r"(?:\S*/)?llmgrpc\s+([a-z][\w-]*)([^#|;]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)")
VARIABLE = re.compile(r"\bLLMGRPC_[A-Z0-9_]+\b")
# A row of a settings table: | `name`, `name` | default | meaning |
SETTINGS_ROW = re.compile(r"^\|\s*((?:`[a-z][a-z0-9_]*`(?:,\s*)?)+)\s*\|")
NAMED_SETTING = re.compile(r"`([a-z][a-z0-9_]*)` setting|settings? `([a-z][a-z0-9_]*)`")


def code_of(text: str) -> list[str]:
    """Each line of the fenced code blocks (a line ending in a backslash joined to the next), and
    each inline code span (which may run across a line break)."""
    pieces: list[str] = []
    prose: list[str] = []
    fenced = False
    continued = ""
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced and line.rstrip().endswith("\\"):
            continued += line.rstrip()[:-1] + " "
        elif fenced:
            pieces.append(continued + line)
            continued = ""
        else:
            prose.append(line)
    pieces += [" ".join(span.split()) for span in INLINE.findall("\n".join(prose))]
    return pieces


@cache
def make_targets() -> frozenset[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([^\s#][^:=]*?)\s*:(?![=])", line)
        if match and "$" not in match.group(1) and "=" not in line.split(":", 1)[0]:
            names = match.group(1).split()
            targets.update(names if names != [".PHONY"] else [])
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
    return frozenset(targets)


@cache
def cli_commands() -> dict[str, frozenset[str]]:
    """Each `llmgrpc` command and the flags it takes."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: frozenset(flag for action in command._actions for flag in action.option_strings)
        for name, command in subparsers.choices.items()
    }


@cache
def variables_read_by_the_code() -> frozenset[str]:
    found: set[str] = set()
    for name in SOURCES:
        path = ROOT / name
        files = [path] if path.is_file() else path.rglob("*")
        for file in files:
            if file.is_file() and (file.suffix in SOURCE_SUFFIXES or file.name == "Containerfile"):
                found.update(VARIABLE.findall(file.read_text(errors="replace")))
    return frozenset(found)


def setting_variables() -> frozenset[str]:
    return frozenset(f"LLMGRPC_{name.upper()}" for name in Settings.model_fields)


def settings_table(text: str) -> list[str]:
    """The names in the first column of the tables under a heading that says Settings."""
    names: list[str] = []
    in_settings = False
    for line in text.splitlines():
        if line.startswith("#"):
            in_settings = "settings" in line.lower()
        elif in_settings and (row := SETTINGS_ROW.match(line)):
            names += re.findall(r"`(\w+)`", row.group(1))
    return names


def problems(text: str) -> list[str]:
    """What text names that does not exist, one line each."""
    found: list[str] = []
    commands = cli_commands()
    every_flag = frozenset().union(*commands.values())
    for code in code_of(text):
        for target in MAKE.findall(code):
            if target not in make_targets():
                found.append(f"make {target}: no such target in the Makefile")
        command = LLMGRPC.match(code)
        if command:
            name, rest = command.groups()
            if name not in commands:
                found.append(f"llmgrpc {name}: no such command")
            else:
                found += [
                    f"llmgrpc {name} {flag}: no such flag"
                    for flag in FLAG.findall(rest)
                    if flag.split("=")[0] not in commands[name]
                ]
        elif re.fullmatch(r"--[a-zA-Z][\w-]*(?:[ =]\S+)?", code.strip()):
            flag = FLAG.match(code.strip()).group(1)  # type: ignore[union-attr]
            if flag not in every_flag and flag not in OTHER_PROGRAMS_FLAGS:
                found.append(f"{flag}: no llmgrpc command takes it")
    for variable in sorted(set(VARIABLE.findall(text))):
        if variable not in setting_variables() and variable not in variables_read_by_the_code():
            found.append(f"{variable}: neither a setting nor read by the code")
    fields = set(Settings.model_fields)
    found += [f"setting {name}: not in Settings" for name in settings_table(text) if name not in fields]
    for match in NAMED_SETTING.finditer(text):
        name = match.group(1) or match.group(2)
        if name not in fields:
            found.append(f"setting {name}: not in Settings")
    return found


@pytest.mark.parametrize("page", DOCS, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_target_command_flag_and_setting_a_page_names_exists(page: Path):
    assert problems(page.read_text()) == []


def headings(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them (fenced code left out)."""
    anchors: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        fenced ^= bool(FENCE.match(line))
        if not fenced and line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def broken_links(page: Path) -> list[str]:
    """Links to a file of the repository, or to a heading of one, that lead nowhere."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in headings(linked)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", DOCS, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_to_a_page_of_the_repository_resolves(page: Path):
    assert broken_links(page) == []


def test_a_link_to_a_missing_page_or_heading_is_caught(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other\n\n## The GPU path\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#the-gpu-path) [b](other.md#the-cpu-path) [c](gone.md) [d](#nowhere)\n")
    assert broken_links(page) == ["other.md#the-cpu-path", "gone.md", "#nowhere"]


def test_the_front_door_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    found = {target for code in code_of(readme) for target in MAKE.findall(code)}
    assert {"serve", "test"} <= found <= make_targets()


def test_the_settings_table_lists_every_setting():
    listed = settings_table((ROOT / "docs" / "operations.md").read_text())
    assert set(Settings.model_fields) - set(listed) == set()


def test_made_up_names_are_caught():
    text = "\n".join(
        [
            "Run `make deploy-to-the-moon`, then `make TORCH=torch install`.",
            "```sh",
            "llmgrpc launch --model-name tiny-llama-3.1 --warp-speed 9",
            ".venv/bin/llmgrpc teleport tiny",
            "LLMGRPC_NOT_A_SETTING=1 llmgrpc serve --port 0 \\",
            "    --made-up-setting 1",
            "```",
            "The flag `--no-such-flag` and the `not_a_field` setting.",
            "## Settings",
            "| `port`, `made_up_s` | 1 | nothing |",
        ]
    )
    assert sorted(problems(text)) == sorted(
        [
            "make deploy-to-the-moon: no such target in the Makefile",
            "llmgrpc launch --warp-speed: no such flag",
            "llmgrpc teleport: no such command",
            "llmgrpc serve --made-up-setting: no such flag",
            "--no-such-flag: no llmgrpc command takes it",
            "LLMGRPC_NOT_A_SETTING: neither a setting nor read by the code",
            "setting made_up_s: not in Settings",
            "setting not_a_field: not in Settings",
        ]
    )
