"""One way to write a file: every output of the package goes through ``flystage.files``
(whole or not at all, never over a file unless asked). Read from the source, so a new
hand-rolled writer fails here instead of leaving half a file after a crash."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "code" / "flystage"
WRITERS = {"atomic_write", "atomic_path"}
WRITE_CALLS = {"write_text", "write_bytes", "savefig", "imwrite", "replace", "rename"}

# Writes that do not go through a `with atomic_...` block in the same function, and why.
ALLOWED = {
    # The three artefact files each enter atomic_path through one ExitStack.
    ("training/export.py", "write_text"),
    # SageMaker's failure file: one line written as the process dies, read only by SageMaker.
    ("training/train.py", "write_text"),
    # The download into a temporary folder, and the marker of a staging folder that is then
    # renamed into place whole.
    ("datasets.py", "open"),
    ("datasets.py", "write_text"),
    # The example state file inside the IAM check's temporary folder.
    ("cloud/check.py", "write_text"),
}


def _is_write(call: ast.Call) -> str | None:
    """The name of the writing call, or None."""
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in WRITE_CALLS:
        if func.attr in ("replace", "rename"):  # os.replace / os.rename, not str.replace
            is_os = isinstance(func.value, ast.Name) and func.value.id == "os"
            return func.attr if is_os else None
        return func.attr
    if isinstance(func, ast.Name) and func.id == "open":
        mode = call.args[1] if len(call.args) > 1 else None
        mode = mode or next((k.value for k in call.keywords if k.arg == "mode"), None)
        if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+"):
            return "open"
    return None


def _inside_writer(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                name = getattr(getattr(call, "func", None), "id", None) or getattr(
                    getattr(call, "func", None), "attr", None
                )
                if name in WRITERS:
                    return True
    return False


def unguarded_writes(source: str) -> list[tuple[str, int]]:
    """(call name, line) of every write in ``source`` outside a ``with atomic_*(...)`` block."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return [
        (name, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (name := _is_write(node))
        and not _inside_writer(node, parents)
    ]


def test_every_output_goes_through_flystage_files():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "files.py":
            continue
        for name, line in unguarded_writes(path.read_text(encoding="utf-8")):
            if (rel, name) not in ALLOWED:
                found.append(f"{rel}:{line} {name}")
    assert not found, "write these through flystage.files.atomic_write/atomic_path: " + ", ".join(
        found
    )


def test_the_reader_sees_a_hand_rolled_writer_and_passes_a_guarded_one():
    hand_rolled = (
        "import os\n"
        "def save(p, text):\n"
        "    tmp = p.with_suffix('.tmp')\n"
        "    tmp.write_text(text)\n"
        "    os.replace(tmp, p)\n"
        "    with open(p, 'a') as f:\n"
        "        f.write(text)\n"
    )
    assert unguarded_writes(hand_rolled) == [("write_text", 4), ("replace", 5), ("open", 6)]
    guarded = (
        "def save(p, text):\n"
        "    with atomic_path(p) as tmp:\n"
        "        tmp.write_text(text.replace('a', 'b'))\n"
        "    with open(p, 'rb') as f:\n"
        "        return f.read()\n"
    )
    assert unguarded_writes(guarded) == []
