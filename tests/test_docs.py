"""The README and docs/ say what runs: every command's flags are the CLI's, every link and path exists,
and the Python examples marked runnable run.

- Each fenced shell block (```bash, sh, shell, console) is cut into commands; `lowrank ...` and
  `python -m MODULE ...` are parsed by the module's own argparse parser, in-process (``main(argv)`` is
  called with ``parse_args`` patched to stop right after parsing, so nothing else runs), with
  abbreviations off: an unknown or misspelt flag, a wrong choice or a missing argument fails here.
- Every relative link (and its #anchor, as GitHub makes heading anchors) points to something that
  exists, and so does every inline-code path under lowrank/, kernels/, benchmarks/, tests/, examples/
  and docs/.
- Every ```python block compiles; those with `<!-- runnable -->` on the line above run, a page's blocks
  in order in one temporary folder.
"""
import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell", "console")
RUNNABLE = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"(?:lowrank|kernels|benchmarks|tests|examples|docs)/[\w./*-]*")
OPERATORS = {"&&", "||", ";", "|", "&"}


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_blocks(page: Path):
    """[(language, text, runnable, line number of the fence)] of ``page``."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((m.group(1), m.group(2), before == RUNNABLE, text.count("\n", 0, m.start()) + 1))
    return blocks


def shell_commands(language: str, block: str):
    """The commands of a shell block, each a token list (comments, prompts and operators removed)."""
    lines = block.replace("\\\n", " ").splitlines()
    if language == "console":                                   # only "$ " lines are commands
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    commands = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in OPERATORS:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def python_module_call(tokens):
    """(module, argv) of a `lowrank ...` or `python -m MODULE ...` command (after any launcher such as
    mpiexec), else None."""
    for i, token in enumerate(tokens):
        if token == "lowrank":
            return "lowrank.app.cli", tokens[i + 1:]
        if token in ("python", "python3") and tokens[i + 1:i + 2] == ["-m"]:
            return tokens[i + 2], tokens[i + 3:]
    return None


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once the command line has parsed."""


def parse_with_module(module: str, argv: list):
    """Run ``module``'s ``main(argv)`` until its parser has parsed ``argv``; return every option string of
    the parsers that took part (a command's subcommand parsers included). SystemExit if argparse refused."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"python -m {module}: no such module"
    if spec.submodule_search_locations is not None:              # a package runs its __main__
        assert importlib.util.find_spec(module + ".__main__") is not None, f"python -m {module}: no __main__"
        module += ".__main__"
    seen = []
    known, parse_args = argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args

    def recording_known(self, args=None, namespace=None):
        self.allow_abbrev = False                                # --max-new must not pass for --max-new-tokens
        seen.append(self)
        return known(self, args, namespace)

    def stopping(self, args=None, namespace=None):
        parse_args(self, args, namespace)
        raise _Parsed

    main = importlib.import_module(module).main
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", recording_known), \
            mock.patch.object(argparse.ArgumentParser, "parse_args", stopping), \
            pytest.raises(_Parsed):
        main(list(argv))
    return {s for p in seen for a in p._actions for s in a.option_strings}


def _commands():
    for page in PAGES:
        for language, block, _, line in fenced_blocks(page):
            if language in SHELLS:
                for tokens in shell_commands(language, block):
                    yield pytest.param(tokens, id=f"{_rel(page)}:{line}:{' '.join(tokens)[:60]}")


COMMANDS = list(_commands())


def test_the_pages_have_shell_blocks_and_lowrank_commands():
    calls = [p.values[0] for p in COMMANDS if python_module_call(p.values[0])]
    assert len(calls) >= 20                     # the scan found them: a broken fence pattern would find none
    assert {"generate", "serve", "export-gguf", "lm"} <= {argv[0] for module, argv in map(python_module_call, calls)
                                                          if module == "lowrank.app.cli" and argv}


@pytest.mark.parametrize("tokens", COMMANDS)
def test_each_command_parses_with_its_own_parser(tokens, capsys):
    while re.fullmatch(r"\w+=\S*", tokens[0]):                  # VAR=value before the command
        tokens = tokens[1:]
    call = python_module_call(tokens)
    if call is not None:
        module, argv = call
        try:
            options = parse_with_module(module, argv)
        except SystemExit:
            error = capsys.readouterr().err.strip().splitlines()[-1:]
            pytest.fail(f"{' '.join(tokens)}: argparse refused it: {error}")
        flags = {t.split("=", 1)[0] for t in argv if t.startswith("--")}
        assert flags <= options, f"{' '.join(tokens)}: unknown {sorted(flags - options)}"
    elif tokens[0] == "bash":
        assert (ROOT / tokens[1]).is_file(), f"{' '.join(tokens)}: no script {tokens[1]}"
    elif tokens[0] == "pytest" and "-p" in tokens:
        plugin = tokens[tokens.index("-p") + 1]
        assert importlib.util.find_spec(plugin) is not None, f"{' '.join(tokens)}: no plugin {plugin}"


def test_a_misspelt_or_abbreviated_flag_is_caught(capsys):
    with pytest.raises(SystemExit):
        parse_with_module("lowrank.app.cli", ["generate", "--model", "m", "--max-new", "4"])
    with pytest.raises(SystemExit):
        parse_with_module("benchmarks.peers", ["--rows", "nosuchrow"])
    assert "--lowrank-backend" not in parse_with_module("lowrank.app.cli", ["serve", "--model", "m"])


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_and_code_path_exists(page):
    text = FENCE.sub("", page.read_text())
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):                         # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            missing.append(f"{target} (no such heading)")
    for span in re.findall(r"`([^`\n]+)`", text):
        if CODE_PATH.fullmatch(span) and not any(ROOT.glob(span.rstrip("/"))):
            missing.append(f"`{span}`")
    assert not missing, f"{_rel(page)}: {missing}"


def test_the_readme_links_each_docs_page_and_the_reading_order_exists():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    order = readme.split("## Read the code in this order", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\d+\. ", order, flags=re.M)
    assert len(steps) >= 8 and len(LINK.findall(order)) >= len(steps)
    assert len(readme.splitlines()) <= 200


def _python_blocks():
    for page in PAGES:
        for language, block, runnable, line in fenced_blocks(page):
            if language == "python":
                yield page, block, runnable, line


def test_every_python_block_compiles():
    blocks = list(_python_blocks())
    assert blocks
    for page, block, _, line in blocks:
        compile(block, f"{_rel(page)}:{line}", "exec")


@pytest.mark.parametrize("page", [p for p in PAGES if any(r for q, _, r, _ in _python_blocks() if q == p)], ids=_rel)
def test_runnable_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for q, block, runnable, line in _python_blocks():
        if q == page and runnable:
            exec(compile(block, f"{_rel(page)}:{line}", "exec"), {"__name__": "__docs__"})
