"""The README and the documentation site say what the code does (issue 33 item 4).

Every fenced block of README.md and docs/*.md is held to the code:
- a Python block runs as written (offline, in a fresh process, on the checkout's code) and must exit 0;
- a shell block's commands are checked without running them: each ``nqpq ...`` line (also ``python -m nqpq``,
  ``torchrun ... -m nqpq``) must parse with the real parser, each ``python -m MODULE --flag`` must name a module of
  the checkout and flags that module defines, each ``bash FILE`` / ``pytest PATH`` a file that exists, each
  ``pip install -e ".[extra]"`` an extra that pyproject.toml defines; any other command fails until this file is
  taught how to check it;
- ``<!-- table-from: CMD -->`` before a Markdown table: CMD (a printing benchmark module) is run and must print that
  table, line for line;
- ``<!-- numbers-from: FILE -->`` before an output block: its number lines (baseline, [A], each d_r, the verdict)
  must be FILE's;
- ``<!-- keys-of: PATH -->`` before a table in docs/results-json.md: its first column must name exactly the keys of
  that part of a real results.json (a sweep and a scan run here on a tiny model);
- docs/api.md documents every name of ``nqpq.__all__``, and docs/hooks.py renders every flag of the parser.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

DOCS = REPO / "docs"


def _hooks():
    """docs/hooks.py, the site's build hook: it finds the CLI through pyproject.toml's entry point, as we do here."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


CLI = _hooks().cli_module()  # the module behind the `nqpq` console script: its build_parser() and main()
# The printing-only benchmark modules a table-from marker may run (the others write CSVs into benchmarks/results).
TABLE_COMMANDS = ("benchmarks.models_table", "benchmarks.sizing")
# Commands a block may use that need no check of their own.
PLAIN_COMMANDS = {"cd", "cp", "mkdir", "export", "mkdocs", "git", "ls", "cat", "rm", "echo", "sleep", "kill", "head",
                  "tail", "wc", "diff", "tee", "grep", "du"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"^<!--\s*([\w-]+):\s*([^\n]*?)\s*-->\s*\Z", re.M)  # on a line of its own


@dataclass(frozen=True)
class Block:
    where: str       # file:line, for messages
    lang: str
    body: str
    marker: tuple[str, str] | None  # (kind, argument) of an HTML comment right before the block


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def fenced_blocks(path: Path, text: str | None = None) -> list[Block]:
    text = path.read_text(encoding="utf-8") if text is None else text
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip()
        marker = MARKER.search(before[-2000:])
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(f"{path.name}:{line}", match.group(1).lower(), match.group(2),
                            (marker.group(1), marker.group(2)) if marker else None))
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in markdown_files() for block in fenced_blocks(path)]


# ---- shell blocks: every command checked against the code ------------------------------------------------------


def logical_lines(body: str, lang: str = "bash") -> list[str]:
    """The block's commands: backslash continuations joined, blank lines dropped; in a ``console`` block only the
    lines after a ``$ `` prompt (the rest is what the command printed)."""
    lines = [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    if lang == "console":
        return [line.lstrip()[2:] for line in lines if line.lstrip().startswith("$ ")]
    return lines


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at &&, ||, ;, |), comments dropped, VAR=value prefixes dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            out.append(current)
            current = []
        else:
            current.append(token)
    out.append(current)
    result = []
    for words in out:
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]
        if words:
            result.append(words)
    return result


def pyproject_extras() -> set[str]:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def module_flags_problem(module: str, args: list[str]) -> str | None:
    """A module run with ``python -m`` must be the checkout's, and every --flag it is given a literal in its source."""
    if module == "nqpq":
        return nqpq_args_problem(args)
    if module == "pytest":
        return paths_problem(args)
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return f"python -m {module}: no such module"
    if not Path(spec.origin).resolve().is_relative_to(REPO):
        return f"python -m {module}: not a module of this checkout"
    source = Path(spec.origin).read_text(encoding="utf-8")
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and f'"{flag}"' not in source and f"'{flag}'" not in source:
            return f"python -m {module}: {flag} is not a flag of {Path(spec.origin).relative_to(REPO)}"
    return None


def nqpq_args_problem(args: list[str]) -> str | None:
    """The nqpq command line must parse with the real parser (argparse's own message when it does not)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            CLI.build_parser().parse_args(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # --help exits 0
            return f"nqpq {' '.join(args)}: {stderr.getvalue().strip().splitlines()[-1]}"
    return None


def paths_problem(args: list[str]) -> str | None:
    for arg in args:
        if not arg.startswith("-") and not (REPO / arg.split("::")[0]).exists():
            return f"pytest {arg}: no such path"
    return None


def command_problem(words: list[str]) -> str | None:
    """What is wrong with one documented command, or None."""
    name, args = Path(words[0]).name, words[1:]
    # Prefixes that run another command: that command is what is checked.
    if name == "nice":
        return command_problem(args[2:] if args[:1] == ["-n"] else args)
    if name in ("timeout", "time", "env"):
        # their own options (and timeout's duration, env's VAR=value) come first; the command starts after them
        while args and (args[0].startswith("-") or re.fullmatch(r"[A-Za-z_]\w*=.*", args[0])):
            args = args[1:]
        return command_problem(args[1:] if name == "timeout" else args)
    if name == "nqpq":
        return nqpq_args_problem(args)
    if name in ("python", "python3", "torchrun"):
        if "-m" not in args:
            return f"{' '.join(words)}: only `{name} -m MODULE` is checked"
        at = args.index("-m")
        return module_flags_problem(args[at + 1], args[at + 2:])
    if name == "pytest":
        return paths_problem(args)
    if name == "bash":
        script = next((a for a in args if not a.startswith("-")), None)
        return None if script and (REPO / script).is_file() else f"bash {script}: no such file"
    if name == "pip":
        extras = pyproject_extras()
        for arg in args:
            for extra in re.findall(r"\.\[([\w,-]+)\]", arg):
                unknown = set(extra.split(",")) - extras
                if unknown:
                    return f"pip install {arg}: pyproject.toml has no extra {sorted(unknown)}"
        return None
    if name in PLAIN_COMMANDS:
        return None
    return f"{' '.join(words)}: a command tests/test_docs.py does not know how to check"


def shell_problems(block: Block) -> list[str]:
    problems = []
    for line in logical_lines(block.body, block.lang):
        for words in commands(line):
            problem = command_problem(words)
            if problem:
                problems.append(f"{block.where}: {problem}")
    return problems


SHELL_BLOCKS = [b for b in all_blocks() if b.lang in ("bash", "sh", "shell", "console")]
# Commands quoted in the prose (`nqpq sweep --model ... --sink-tokens 0 1`) are checked too, where they give flags:
# a span without one is a name or a template (`nqpq report`, `nqpq COMMAND --help` has one but is caught below).
INLINE_COMMAND = re.compile(r"`((?:nqpq|python3? -m|torchrun|bash) [^`]*? --[^`]*)`")


def inline_commands() -> list[Block]:
    spans = []
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # blocks are checked above
        for match in INLINE_COMMAND.finditer(prose):
            spans.append(Block(f"{path.name}:{prose.count(chr(10), 0, match.start()) + 1}", "inline",
                               match.group(1).replace("\n", " "), None))
    return spans


INLINE_COMMANDS = [b for b in inline_commands() if "COMMAND" not in b.body]
PYTHON = [b for b in all_blocks() if b.lang == "python"]
# A block marked `<!-- fragment: why -->` (it continues a context the page describes) is not run; it must still
# compile, and every nqpq name it imports must exist. Every other Python block runs; identical blocks run once.
FRAGMENTS = [b for b in PYTHON if b.marker and b.marker[0] == "fragment"]
PYTHON_BLOCKS = list({b.body: b for b in PYTHON if b not in FRAGMENTS}.values())


def test_docs_have_blocks_to_check():
    assert SHELL_BLOCKS and PYTHON_BLOCKS and len(INLINE_COMMANDS) >= 10
    assert {b.lang for b in all_blocks()} <= {"bash", "sh", "shell", "console", "python", "text", "json", "yaml", ""}, \
        "a block language test_docs.py does not check"


@pytest.mark.parametrize("block", SHELL_BLOCKS + INLINE_COMMANDS, ids=lambda b: b.where)
def test_every_documented_command_matches_the_code(block):
    assert shell_problems(block) == []


@pytest.mark.parametrize("text, expected", [
    ("nqpq sweep --model smollm2-135m --no-such-flag 3\n", "unrecognized arguments: --no-such-flag"),
    ("nqpq sweep --n-blocks eight\n", "invalid int value"),
    ("nqpq sweeep --out runs/x\n", "invalid choice"),
    ("torchrun --nproc-per-node 2 -m nqpq scan --d-rank 8\n", "unrecognized arguments: --d-rank"),
    ("python -m benchmarks.sweep --device cpu --n-blokcs 8\n", "--n-blokcs is not a flag of benchmarks/sweep.py"),
    ("python -m benchmarks.nothing_here\n", "no such module"),
    ('pip install -e ".[doc]"\n', "no extra ['doc']"),
    ("bash benchmarks/missing.sh\n", "no such file"),
    ("timeout 60 nice -n 5 nqpq scan --no-such-flag\n", "unrecognized arguments: --no-such-flag"),
    ("curl -O https://example.com/x.tar\n", "does not know how to check"),
])
def test_a_command_the_code_does_not_take_fails(text, expected):
    """The checker itself: each wrong command is caught, with a message naming what is wrong."""
    block = fenced_blocks(Path("fake.md"), f"```bash\n{text}```\n")[0]
    problems = shell_problems(block)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_console_block_checks_its_prompt_lines_only():
    text = "$ nqpq sweep --layers 1 --bogus\nusage: nqpq sweep [-h] ...\n$ nqpq models\nname  size\n"
    block = fenced_blocks(Path("fake.md"), f"```console\n{text}```\n")[0]
    problems = shell_problems(block)
    assert len(problems) == 1 and "--bogus" in problems[0], problems


def test_a_good_command_passes_the_checker():
    text = ("NQPQ_X=1 nqpq sweep --model m --layers 1 2 --bos --out o && mkdir -p runs \\\n"
            "  && python -m benchmarks.sweep --device cpu --n-blocks 8   # comment --not-a-flag\n")
    assert shell_problems(fenced_blocks(Path("fake.md"), f"```bash\n{text}```\n")[0]) == []


RUN_BLOCKS = [b for b in SHELL_BLOCKS if b.marker and b.marker[0] == "run"]


def test_some_commands_are_run():
    assert RUN_BLOCKS  # reproduce.md's `nqpq report` of a committed run


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.where)
def test_a_block_marked_run_runs(block, tmp_path):
    """``<!-- run: why -->`` blocks run as written, in a scratch folder where benchmarks/ is the checkout's (they may
    read it, and write only under the scratch folder), with `nqpq` the checkout's code."""
    (tmp_path / "benchmarks").symlink_to(REPO / "benchmarks", target_is_directory=True)
    script = "set -euo pipefail\nnqpq() { python -m nqpq \"$@\"; }\n" + block.body
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    before = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").rglob("*") if p.is_file()}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{block.where}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    after = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").rglob("*") if p.is_file()}
    assert after == before, "a run block wrote into benchmarks/results"


# ---- Python blocks: run as written ------------------------------------------------------------------------------


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.where)
def test_every_python_block_runs_as_written(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.body, encoding="utf-8")
    # The checkout's code (not whatever nqpq is installed), offline, one thread: the suite's conditions.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{block.where}\n{result.stderr[-3000:]}"


def fragment_problems(block: Block) -> list[str]:
    try:
        tree = ast.parse(block.body)
    except SyntaxError as err:
        return [f"{block.where}: does not compile ({err.msg}, line {err.lineno})"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("nqpq", "nqpq_kernels"):
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                problems.append(f"{block.where}: no module {node.module}")
                continue
            problems += [f"{block.where}: {node.module} has no {alias.name}" for alias in node.names
                         if not hasattr(module, alias.name)]
        elif isinstance(node, ast.Import):
            problems += [f"{block.where}: no module {alias.name}" for alias in node.names
                         if alias.name.split(".")[0] in ("nqpq", "nqpq_kernels")
                         and importlib.util.find_spec(alias.name) is None]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nqpq"
              and not hasattr(importlib.import_module("nqpq"), node.attr)):
            problems.append(f"{block.where}: nqpq has no {node.attr}")
    return problems


@pytest.mark.parametrize("block", FRAGMENTS or [None], ids=lambda b: b.where if b else "none")
def test_python_fragments_compile_and_name_what_exists(block):
    if block is not None:
        assert fragment_problems(block) == []


def test_a_fragment_naming_what_does_not_exist_fails():
    text = ("<!-- fragment: continues the page -->\n```python\nfrom nqpq import run_sweep, run_sweeeep\n"
            "nqpq.crystalize(model, [1])\n```\n")
    block = fenced_blocks(Path("fake.md"), text)[0]
    assert block.marker == ("fragment", "continues the page")
    assert fragment_problems(block) == ["fake.md:2: nqpq has no run_sweeeep", "fake.md:2: nqpq has no crystalize"]


# ---- published numbers: tables and outputs from their sources ----------------------------------------------------


def tables_after_markers(kind: str) -> list[tuple[str, str, list[str]]]:
    """(where, marker argument, the table's lines) for every ``<!-- kind: ... -->`` followed by a table."""
    found = []
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(rf"^<!--\s*{kind}:\s*([^\n]*?)\s*-->\n", text, re.M):
            rest = text[match.end():].splitlines()
            table = [line for line in _leading_table(rest)]
            found.append((f"{path.name}:{text.count(chr(10), 0, match.start()) + 1}", match.group(1), table))
    return found


def _leading_table(lines: list[str]) -> list[str]:
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


TABLES_FROM = tables_after_markers("table-from")


def test_published_tables_have_their_commands():
    assert len(TABLES_FROM) >= 3  # README, docs/results.md (real models), docs/multi-gpu.md (sizing)
    for where, _, table in TABLES_FROM:
        assert len(table) >= 3, f"{where}: no table after the marker"


@pytest.mark.parametrize("where, command, table", TABLES_FROM, ids=[t[0] for t in TABLES_FROM])
def test_published_table_is_what_its_command_prints(where, command, table):
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"] and words[2] in TABLE_COMMANDS, f"{where}: {command}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *words[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.splitlines()
    start = printed.index(table[0]) if table[0] in printed else -1
    assert start >= 0 and printed[start:start + len(table)] == table, \
        f"{where}: the table differs from what `{command}` prints now; paste its output"


NUMBER_LINE = re.compile(r"PPL baseline|\[A\]|d_r=\s*\d+/|=>")


def test_shown_output_has_the_committed_numbers():
    shown = [b for b in all_blocks() if b.marker and b.marker[0] == "numbers-from"]
    assert len(shown) >= 2  # README and the quickstart
    for block in shown:
        source = (REPO / block.marker[1]).read_text(encoding="utf-8").splitlines()
        numbers = [line for line in block.body.splitlines() if NUMBER_LINE.search(line)]
        assert len(numbers) >= 8, block.where
        for line in numbers:
            assert line in source, f"{block.where}: {line!r} is not in {block.marker[1]}"


# ---- results.json's schema page against a real results.json ------------------------------------------------------


@pytest.fixture(scope="module")
def written_results(saved_model, tmp_path_factory) -> dict[str, dict]:
    """A sweep and a scan on the tiny saved model, with two sink settings and two calibration draws."""
    model_dir, text_file = saved_model
    root = tmp_path_factory.mktemp("schema")
    common = ["--model", str(model_dir), "--text-file", str(text_file), "--n-blocks", "3", "--seq-len", "32",
              "--calib-blocks", "1", "--calib-draws", "2", "--d-r", "1", "4", "--sink-tokens", "0", "1",
              "--device", "cpu", "--no-progress"]
    results = {}
    # --heads: every key of results.json's heads is written (the sweep by index, the scan by a rule any head meets).
    for kind, extra in (("sweep", ["--layers", "2", "3", "--heads", "2:0,1", "3:1"]),
                        ("scan", ["--layers", "1", "3", "--heads", "top1_prob>=0"])):
        with contextlib.redirect_stdout(io.StringIO()):
            assert CLI.main([kind, *common, *extra, "--out", str(root / kind)]) == 0
        results[kind] = json.loads((root / kind / "results.json").read_text(encoding="utf-8"))
    return results


def _part(results: dict[str, dict], path: str) -> dict:
    """``sweep.curve[]`` -> the first entry of results['sweep']['curve'], and so on."""
    kind, *keys = path.split(".")
    part = results[kind]
    for key in keys:
        part = part[key.removesuffix("[]")]
        if key.endswith("[]"):
            part = part[0]
    return part


SCHEMA_TABLES = [t for t in tables_after_markers("keys-of") if t[0].startswith("results-json.md")]


def test_schema_page_covers_results_json():
    assert {arg for _, arg, _ in SCHEMA_TABLES} >= {"sweep", "sweep.curve[]", "sweep.config", "scan", "scan.layers[]"}


@pytest.mark.parametrize("where, path, table", SCHEMA_TABLES, ids=[t[1] for t in SCHEMA_TABLES])
def test_schema_table_names_exactly_the_keys_written(where, path, table, written_results):
    documented = set()
    for row in table[2:]:
        documented |= set(re.findall(r"`([\w]+)`", row.split("|")[1]))
    written = set(_part(written_results, path))
    assert documented == written, (f"{where} ({path}): documented but not written {sorted(documented - written)}, "
                                   f"written but not documented {sorted(written - documented)}")


# ---- the reference pages follow the code --------------------------------------------------------------------------


def test_api_page_documents_every_public_name():
    import nqpq

    page = (DOCS / "api.md").read_text(encoding="utf-8")
    targets = re.findall(r"^::: ([\w.]+)$", page, re.M)
    assert {f"nqpq.{name}" for name in nqpq.__all__} <= set(targets)
    for target in targets:  # every target names something real (mkdocstrings would fail the build otherwise)
        module, _, attr = target.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), target


def test_cli_reference_renders_every_subcommand_and_flag():
    hooks = _hooks()
    assert hooks.MARKER in (DOCS / "cli.md").read_text(encoding="utf-8")
    parser = hooks.cli_parser()
    rendered = hooks.render_cli_reference(parser)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert f"## nqpq {name}\n" in rendered
        for action in sub._actions:
            for option in action.option_strings:
                assert option in rendered, (name, option)


def test_layout_page_lists_every_module():
    hooks = _hooks()
    assert hooks.LAYOUT_MARKER in (DOCS / "layout.md").read_text(encoding="utf-8")
    rendered = hooks.render_layout()
    for root in hooks.LAYOUT_ROOTS:
        for path in (REPO / root).rglob("*.py"):
            assert f"| `{path.relative_to(REPO).as_posix()}` |" in rendered, path


def test_readme_fits_on_a_screen():
    """The README answers, shows the first command and the answer, and points to the site; the rest lives there."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        assert f": {page.name}" in nav, f"docs/{page.name} is not in mkdocs.yml's nav"
