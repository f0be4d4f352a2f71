"""The repository's top level: flat, as in nanoGPT, and told apart in the README. Every top-level module is
either a command you run or a module you read; its docstring opens saying which, and the README lists it in
that table. No top-level name hides a standard-library or installed module from code run in the repo root."""

import ast
import importlib.util
import os
import re
import sys

from conftest import ROOT

TOP = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
PACKAGES = sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and not d.startswith(".")
                  and any(f.endswith(".py") for f in os.listdir(os.path.join(ROOT, d))))
PYTHON_FILES = [f"{name}.py" for name in TOP] + [os.path.relpath(p, ROOT) for p in sorted(
    os.path.join(ROOT, "data", d, f) for d in os.listdir(os.path.join(ROOT, "data"))
    if os.path.isdir(os.path.join(ROOT, "data", d)) for f in os.listdir(os.path.join(ROOT, "data", d)) if f.endswith(".py"))] \
    + ["data/common.py"]


def opening(path):
    """The first line of a file's docstring."""
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, path)).read()))
    assert doc, f"{path} has no docstring"
    return doc.splitlines()[0]


def readme_table(heading):
    """The first column of the README table whose header row starts with `heading`."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = re.search(rf"^\| {heading} \|.*?\n((?:\|.*\n)+)", text, re.M)
    assert table, f"the README has no table headed {heading!r}"
    return [re.sub(r"\[?`([^`]+)`\]?(\(.*?\))?", r"\1", row.split("|")[1].strip()) for row in table.group(1).splitlines()[1:]]


def test_no_top_level_name_shadows_another_module():
    """From the repo root, `import evaluate` found our file instead of Hugging Face's (lm-eval's tasks import
    it). Searched on sys.path without the repo root, none of our names may exist."""
    path = [p for p in sys.path if p and os.path.abspath(p) != ROOT]
    for name in TOP + PACKAGES:
        assert name not in sys.stdlib_module_names, f"{name} is a standard-library module"
        found = importlib.machinery.PathFinder.find_spec(name, path)
        assert found is None, f"{name}.py hides {found.origin}"


def test_every_python_file_says_whether_it_is_a_command_or_a_module():
    commands, modules = readme_table("command"), readme_table("module")
    for path in PYTHON_FILES:
        first = opening(path)
        assert first.startswith(("Command: python ", "Module: ")), f"{path}'s docstring opens: {first!r}"
        listed = commands if first.startswith("Command") else modules
        assert path in listed or (path.startswith("data/") and "data/*/prepare.py" in listed), \
            f"{path} is missing from the README's {first.split(':')[0].lower()} table"
        if first.startswith("Command"):
            assert first.split()[2] == path, f"{path}'s usage line names {first.split()[2]}"
    assert sorted(commands + modules) == sorted(set(commands + modules)), "a file listed twice"

