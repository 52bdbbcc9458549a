"""Kernel tests run the Triton kernels on CPU through the interpreter, against ``kernels/reference.py``.

``TRITON_INTERPRET`` must be set before triton is *imported*: triton's own ``@jit`` library functions
(``tl.sum``, ``tl.max``, ...) are built as interpreted or compiled at that moment. So it is set here,
before any test module imports a kernel. If something imported triton earlier in the same pytest run,
the interpreter cannot work; every kernel test then fails with that explanation rather than with an
obscure error. Without triton installed the whole folder is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_IMPORTED_EARLY = "triton" in sys.modules
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]


def _interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


@pytest.fixture(autouse=True)
def _triton_interpreter():
    if _IMPORTED_EARLY and not _interpreted():
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
            "set it in the environment (or in tests/conftest.py) when running without a GPU"
        )
