"""No module reaches into another object's private state: ``x._name`` is only ever ``self._name`` or
``cls._name`` (or a name the module defines itself). The few third-party privates shoal must touch are
listed below, each with its reason; anything else fails here with its file and line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "kernels", "router", "workers")

# (file, attribute): a third-party private with no public way to do the same.
ALLOWED = {
    ("cluster/bench/throughput.py", "_attn_implementation"),  # transformers: pick SDPA for the HF reference
    ("workers/executor/kv_transfer/link.py", "_timeout"),  # torch gloo options: the transfer timeout
    ("workers/executor/tp_group.py", "_abort_process_group"),  # torch: abort NCCL when a rank died
    ("kernels/triton_utils.py", "_patch_lang_tensor"),  # Triton < 3.7 interpreter shim
    ("kernels/triton_utils.py", "_shoal_squeezes"),  # our own marker on the patched function
}
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public despite the underscore


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path


def private_reaches(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, 'owner._attr')`` for every private attribute read off something other than self/cls."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr in NAMEDTUPLE_API or (attr.startswith("__") and attr.endswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        found.append((node.lineno, f"{ast.unparse(owner)}.{attr}"))
    return found


def test_the_check_sees_a_reach_and_spares_self():
    tree = ast.parse("class A:\n    def f(self, other):\n        self._x = other._y\n        super()._z()\n")
    assert private_reaches(tree) == [(3, "other._y")]


def test_no_module_reaches_into_another_objects_private_state():
    bad = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for line, what in private_reaches(ast.parse(path.read_text(), rel)):
            if (rel, what.rsplit(".", 1)[1]) not in ALLOWED:
                bad.append(f"{rel}:{line}: {what}")
    assert not bad, "private state reached from outside its object:\n" + "\n".join(bad)
