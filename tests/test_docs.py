"""The README and docs/ stay navigable and their commands stay runnable.

Every shell command in a ```bash block of README.md, docs/*.md and bench/README.md is checked
against the code as written: pip extras exist, ``pytest`` invocations collect tests with those
options, ``clq-triton`` lines parse with the real argument parser, scripts exist and accept
every ``--flag`` they are given. The expensive ones also run elsewhere: ``pytest`` is CI's
command, ``clq-triton quickstart`` runs in tests/test_examples.py, ``bench/gpu_session.sh``
in tests/test_gpu_session.py (with a stub interpreter).
"""

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "bench/README.md"] + sorted(
    f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def _read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def commands(page: str) -> list[str]:
    """The commands of a page: lines of its ```bash blocks (comments dropped, continuations
    joined) and inline code that starts with a command (`python ...`, `pytest ...`)."""
    text = _read(page)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`((?:python|pytest|clq-triton|bash|pip|[A-Z_]+=\S+ bash) [^`]*)`",
                           prose.replace("\n", " ")):
        out.append(" ".join(span.split()))
    return out


ALL = sorted({(page, cmd) for page in PAGES for cmd in commands(page)})


def test_readme_is_short_and_links_every_docs_page():
    readme = _read("README.md")
    assert len(readme.splitlines()) < 250
    for page in PAGES[2:]:
        assert f"]({page})" in readme, f"{page} is not linked from the README"
    for target in re.findall(r"\]\(((?:docs|bench)/[^)#]+)", readme):
        assert os.path.exists(os.path.join(ROOT, target)), target
    assert {'pip install -e ".[test]"', "pytest", "pytest --benchmark-only",
            "clq-triton quickstart"} <= set(commands("README.md"))


@functools.lru_cache(maxsize=None)
def _pytest_options() -> frozenset:
    """Every --option this project's pytest accepts (its plugins' included)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return frozenset(re.findall(r"(--[\w-]+)", out.stdout))


def test_pytest_skips_benchmarks_and_benchmark_only_runs_them():
    """`pytest` (the test command) collects bench/ but skips its benchmarks; `pytest
    --benchmark-only` from the repository root runs them, and only them."""
    def run(*args):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "-k", "test_host_overhead", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    plain = run("--benchmark-columns=median")
    assert re.search(r"\b5 skipped", plain) and "passed" not in plain, plain[-1500:]
    timed = run("--benchmark-only", "--benchmark-columns=median")
    assert re.search(r"\b5 passed", timed) and "test_host_overhead[w4a4]" in timed, timed[-1500:]


def _script_flags(path: str) -> set[str]:
    """--flags a script (or the modules it runs) accepts: argparse options in its source."""
    with open(path) as f:
        src = f.read()
    flags = set(re.findall(r"""["'](--[\w-]+)["']""", src))
    return flags


@pytest.mark.parametrize("page, cmd", ALL, ids=[f"{p}: {c[:60]}" for p, c in ALL])
def test_documented_command_is_current(page, cmd):
    env_free = [w for w in shlex.split(cmd) if not re.match(r"^[A-Z_]+=", w)]
    prog, args = env_free[0], env_free[1:]
    if prog == "pip":
        assert args[0] == "install"
        spec = " ".join(args)
        if ".[test]" in spec:
            assert re.search(r"^test = ", _read("pyproject.toml"), re.M)
        if "torch" in spec and "-e" not in args:
            assert re.search(r'torch[=<>]=?2\.1[1-4]', spec), spec
        return
    if prog == "pytest":
        known = _pytest_options()
        words = iter(args)
        for word in words:
            if word in ("-k", "-m", "-p"):
                next(words)  # its value
            elif word.startswith("--"):
                assert word.split("=")[0] in known, f"pytest has no option {word}"
            elif not word.startswith("-") and "/" in word or word.endswith(".py"):
                assert os.path.exists(os.path.join(ROOT, word.split("::")[0])), word
        return
    if prog == "clq-triton" or args[:2] == ["-m", "clq_triton.cli"]:
        from clq_triton.cli import parser

        parser().parse_args(args if prog == "clq-triton" else args[2:])
        return
    if prog in ("python", "bash"):
        if args[0] == "-m":
            path = os.path.join(ROOT, *args[1].split(".")) + ".py"
            rest = args[2:]
        else:
            path, rest = os.path.join(ROOT, args[0]), args[1:]
        assert os.path.exists(path), path
        flags = _script_flags(path)
        if path.endswith("quickstart.py"):
            flags |= _script_flags(os.path.join(ROOT, "clq_triton", "cli.py"))
        for word in rest:
            if word.startswith("--"):
                assert word.split("=")[0] in flags, f"{path} has no option {word}"
        return
    pytest.fail(f"no check for the documented command {cmd!r}: add one here")
