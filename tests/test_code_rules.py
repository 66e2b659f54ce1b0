"""Rules for glmc's own code, checked on its syntax tree (each rule is also run on a
snippet that breaks it, so a checker that finds nothing cannot pass by accident):

- target strings are parsed only by glmc/target.py (no `.split(":")` elsewhere);
- environment variables are read only by glmc/settings.py;
- a handler for Exception / BaseException / everything re-raises or records the error
  it caught (binds it and uses it), never swallows it;
- library code does not print (warnings / logging / the CLI do the talking).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("glmc", "passes", "backends")
SCRIPTS = ("bench",)


def _files(*pkgs):
    for pkg in pkgs:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def target_splits(tree: ast.AST) -> list[int]:
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("split", "rsplit", "partition", "rpartition") and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == ":"):
            out.append(node.lineno)
    return out


def env_reads(tree: ast.AST) -> list[int]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "environb"):
            out.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv") for a in node.names):
            out.append(node.lineno)
    return out


def _catches_everything(handler: ast.ExceptHandler) -> bool:
    t = handler.type
    if t is None:
        return True
    names = t.elts if isinstance(t, ast.Tuple) else [t]
    return any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException") for n in names)


def swallowed(tree: ast.AST) -> list[int]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and _catches_everything(node):
            body = ast.Module(body=node.body, type_ignores=[])
            raises = any(isinstance(n, ast.Raise) for n in ast.walk(body))
            uses = node.name is not None and any(
                isinstance(n, ast.Name) and n.id == node.name for n in ast.walk(body))
            if not (raises or uses):
                out.append(node.lineno)
    return out


def prints(tree: ast.AST) -> list[int]:
    main_blocks = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            main_blocks |= {id(n) for n in ast.walk(node)}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
            and id(node) not in main_blocks]


RULES = {
    "target split outside glmc/target.py": (target_splits, LIBRARY + SCRIPTS, {"glmc/target.py"}),
    "environment read outside glmc/settings.py": (env_reads, LIBRARY + SCRIPTS, {"glmc/settings.py"}),
    "except Exception without re-raise or recorded reason": (swallowed, LIBRARY + SCRIPTS, set()),
    "print in library code": (prints, LIBRARY, {"glmc/cli.py"}),
}

BROKEN = {
    "target split outside glmc/target.py": "kind = target.split(':', 1)[0]",
    "environment read outside glmc/settings.py": "import os\nx = os.environ.get('X')",
    "except Exception without re-raise or recorded reason": "try:\n    f()\nexcept Exception:\n    pass",
    "print in library code": "print('hello')",
}
ALLOWED = {
    "except Exception without re-raise or recorded reason":
        "try:\n    f()\nexcept Exception as e:\n    why = str(e)\ntry:\n    g()\nexcept BaseException:\n    raise",
    "print in library code": "if __name__ == '__main__':\n    print('child process output')",
}


@pytest.mark.parametrize("rule", list(RULES))
def test_rule_holds(rule):
    check, pkgs, exempt = RULES[rule]
    found = []
    for path in _files(*pkgs):
        rel = path.relative_to(ROOT).as_posix()
        if rel in exempt:
            continue
        found += [f"{rel}:{line}" for line in check(ast.parse(path.read_text()))]
    assert not found, f"{rule}: {found}"


@pytest.mark.parametrize("rule", list(RULES))
def test_rule_checker_catches_a_violation(rule):
    check = RULES[rule][0]
    assert check(ast.parse(BROKEN[rule])), rule
    if rule in ALLOWED:
        assert not check(ast.parse(ALLOWED[rule])), rule
