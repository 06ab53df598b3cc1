"""MkDocs hook: the command-line reference page rendered from nqpq's own argparse parser.

Nothing in ``docs/cli.md`` lists a flag by hand: the marker ``<!-- nqpq-cli-reference -->`` is replaced at build
time by every subcommand's usage, description and options, read from the parser the ``nqpq`` console script builds.
The parser is found through ``[project.scripts]`` in pyproject.toml (``nqpq = "module:function"``: the module's
``build_parser()``), so a module that moves keeps the page right as long as the entry point follows it.
"""

from __future__ import annotations

import argparse
import ast
import html
import importlib
import itertools
import re
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- nqpq-cli-reference -->"
LAYOUT_MARKER = "<!-- nqpq-layout -->"
LAYOUT_ROOTS = ("nqpq", "nqpq_kernels", "benchmarks", "tests")


def cli_module() -> ModuleType:
    """The module of the ``nqpq`` console script, as pyproject.toml's entry point names it."""
    # A regular expression, not a TOML parser: tomllib is Python >= 3.11 and nqpq supports 3.10.
    entry = re.search(r'^nqpq\s*=\s*"([\w.]+):\w+"', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    if entry is None:
        raise RuntimeError("pyproject.toml names no `nqpq = \"module:function\"` console script")
    module_name = entry.group(1)
    if str(REPO) not in sys.path:  # the checkout's code, also when mkdocs runs from elsewhere
        sys.path.insert(0, str(REPO))
    return importlib.import_module(module_name)


def cli_parser() -> argparse.ArgumentParser:
    """The parser the ``nqpq`` console script uses (its module's ``build_parser()``)."""
    return cli_module().build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped, whitespace folded (help strings are written for a terminal)."""
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def _signature(action: argparse.Action) -> str:
    """``--flag VALUE`` as the usage line writes it (``--bos, --no-bos`` for a boolean pair)."""
    if not action.option_strings:
        return action.metavar or action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())
    value = f"{metavar} [{metavar} ...]" if action.nargs == "+" else metavar
    return ", ".join(f"{option} {value}" for option in action.option_strings)


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        # _expand_help fills %(default)s and the like, as --help prints them.
        help_text = argparse.HelpFormatter(parser.prog)._expand_help(action) if action.help else ""
        # The signature as HTML code: a Markdown code span would show the backslash of an escaped pipe.
        signature = html.escape(" ".join(_signature(action).split())).replace("|", "&#124;")
        rows.append(f"| <code>{signature}</code> | {_cell(help_text)} |")
    if not rows:
        return ["No options besides `--help`."]
    return ["| argument | meaning |", "|---|---|", *rows]


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    # A fixed width: the page must not depend on the terminal mkdocs ran in.
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return ["```text", formatter.format_help().strip(), "```"]


def render_cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown for every subcommand of ``nqpq``: usage, description and a table of its arguments."""
    parser = parser or cli_parser()
    lines = [*_usage(parser), "", _cell(parser.description or ""), ""]
    top_level = [a for a in parser._actions
                 if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    if top_level:
        lines += _options_table(parser) + [""]
    helps = _subcommand_help(parser)
    for name, sub in _subcommands(parser).items():
        lines += [f"## nqpq {name}", "", _cell(helps.get(name, "")) + ".", ""]
        if sub.description and sub.description != helps.get(name):
            lines += [_cell(sub.description), ""]
        lines += _usage(sub) + [""] + _options_table(sub) + [""]
    return "\n".join(lines)


def _summary(path: Path) -> str:
    """The first sentence of a file's docstring (Python) or of its header comment (shell), read without importing."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
    else:
        comments = [line.lstrip("#").strip() for line in text.splitlines()[1:] if line.startswith("#")]
        doc = " ".join(itertools.takewhile(bool, comments))
    return _cell(_first_sentence(" ".join(doc.split()).replace("``", "`")))


def _first_sentence(text: str) -> str:
    """Up to the first '.', ':' or ';' outside parentheses that ends more than one word (``nqpq: fused ...``)."""
    depth = 0
    for at, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char in ".:;" and depth == 0 and text[at + 1:at + 2] in (" ", "") and " " in text[:at].strip():
            return text[:at]
    return text.rstrip(".:;")


def render_layout(repo: Path = REPO) -> str:
    """A table per top-level folder: every Python module and shell script with its docstring's first sentence."""
    lines = []
    for root in LAYOUT_ROOTS:
        # every module, a sub-package's __init__.py included (its docstring says what the sub-package is for)
        files = sorted(p for p in (repo / root).rglob("*")
                       if p.suffix in (".py", ".sh") and p.is_file() and "__pycache__" not in p.parts)
        lines += [f"## {root}/", "", "| file | what it holds |", "|---|---|"]
        lines += [f"| `{p.relative_to(repo).as_posix()}` | {_summary(p)} |" for p in files]
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - mkdocs' hook signature
    # A marker counts only on a line of its own: a page may quote it in prose (install.md explains the markers).
    for marker, render in ((MARKER, render_cli_reference), (LAYOUT_MARKER, render_layout)):
        pattern = re.compile(rf"^{re.escape(marker)}$", re.MULTILINE)
        if pattern.search(markdown):
            markdown = pattern.sub(lambda _, render=render: render(), markdown)
    return markdown
