"""Small Triton helpers shared by the kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _fix_interpreter_scalar_index() -> None:
    """Triton < 3.7's interpreter turns a scalar used as an index or a ``range`` bound into an int
    with ``int(array)``, but a scalar it loaded (``tl.load(ptr)``) is a 1-element 1-d array, which
    numpy 2 refuses to convert ("only 0-dimensional arrays can be converted"). Triton 3.7 squeezes
    the array first; so does this, for the older interpreters (the GPU image's Triton 3.6)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_shoal_squeezes", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._shoal_squeezes = True
    interpreter._patch_lang_tensor = patched


_fix_interpreter_scalar_index()


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even. The interpreter truncates fp32 -> bf16, so bf16 is
    rounded on the bits first (then the cast is exact): interpreter and GPU agree bit for bit."""
    if dtype == tl.bfloat16 and x.dtype != tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)
