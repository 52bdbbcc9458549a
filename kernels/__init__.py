"""Kernels: Triton implementations and their torch oracle (``reference.py``).

Nothing here imports the rest of shoal: every kernel takes plain tensors (the attention metadata
as explicit arguments), so the model runner can pick the Triton or the reference implementation.
"""
