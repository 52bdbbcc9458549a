"""Kernel tests: the Triton kernels against ``kernels/reference.py``.

Without a GPU they run on CPU through the interpreter. With CUDA present they run **compiled** on the
GPU: every tensor a test makes is made there (``torch.set_default_device("cuda")``, and a bare
``torch.Generator()`` is a CUDA generator), so the kernels, the reference and the comparison all run on
the device, with the strides and views the tests build. ``SHOAL_KERNEL_TESTS=interpret`` forces the
interpreter on a GPU machine too (to check the interpreter path there).

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
import torch

_IMPORTED_EARLY = "triton" in sys.modules
COMPILED = torch.cuda.is_available() and os.environ.get("SHOAL_KERNEL_TESTS", "") != "interpret"
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]


def _interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def pytest_report_header(config):
    return f"kernel tests: {'compiled on ' + torch.cuda.get_device_name() if COMPILED else 'Triton interpreter (CPU)'}"


if COMPILED:
    _Generator = torch.Generator

    def _cuda_generator(device=None):
        return _Generator(device=device if device is not None else "cuda")

    @pytest.fixture(autouse=True)
    def _on_the_gpu(monkeypatch):
        if _interpreted():
            pytest.fail("TRITON_INTERPRET=1 is set in the environment: unset it to run the kernel tests "
                        "compiled, or set SHOAL_KERNEL_TESTS=interpret to run them interpreted")
        monkeypatch.setattr(torch, "Generator", _cuda_generator)
        torch.set_default_device("cuda")
        try:
            yield
            torch.cuda.synchronize()  # an asynchronous kernel fault is this test's, not the next one's
        finally:
            torch.set_default_device(None)

else:

    @pytest.fixture(autouse=True)
    def _triton_interpreter():
        if _IMPORTED_EARLY and not _interpreted():
            pytest.fail(
                "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
                "set it in the environment (or in tests/conftest.py) when running without a GPU"
            )
