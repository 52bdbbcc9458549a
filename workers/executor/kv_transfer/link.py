"""``KVLink``: one end of a point-to-point connection that carries KV blocks between two workers.

A link is a two-rank torch.distributed process group of its own (gloo on CPU, NCCL on GPU), not the
default group, so it coexists with a tensor-parallel group in the same process. The two ends meet
through a ``TCPStore`` that the prefill worker hosts (:class:`LinkStore`); every link's keys live under
its own ``link_id`` prefix, so one store serves any number of links.

Rank 0 is the prefill (sending) end, rank 1 the decode (receiving) end. The link only moves tensors;
what to send is agreed out of band (the workers' gRPC ``PullKV``), each transfer under its own tag.
NCCL ignores tags and matches operations in order, so a link carries one transfer at a time (the
decode side's link pool hands a link to one puller at a time).

No operation waits forever: each has a deadline; an operation that fails or times out marks the link
broken (its two ends may be out of step) and raises :class:`KVTransferError`. A broken link is closed
and a new one opened.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .import_blocks import KVTransferError

SENDER, RECEIVER = 0, 1
# NCCL completion polling (gloo's wait takes a timeout itself): spin for the first few milliseconds,
# where a small transfer ends, then sleep between polls so a long wait does not burn a core.
_SPIN_S, _POLL_S = 0.005, 0.0005


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class LinkStore:
    """The rendezvous store a prefill worker hosts for the links decode workers open to it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout: timedelta = timedelta(seconds=30)):
        self.host = host
        self.store = dist.TCPStore(host, port, None, is_master=True, wait_for_workers=False,
                                   timeout=timeout, use_libuv=True)
        self.port = self.store.port  # port 0: the OS picked a free one

    def close(self) -> None:
        self.store = None  # the last reference closes the listening socket


class KVLink:
    """One end of a link. Build both ends at about the same time: construction waits for the peer
    (at most ``timeout``)."""

    def __init__(self, link_id: str, rank: int, store: dist.Store, *, device: torch.device | str = "cpu",
                 timeout: timedelta = timedelta(seconds=30)):
        if rank not in (SENDER, RECEIVER):
            raise ValueError(f"rank must be {SENDER} (prefill) or {RECEIVER} (decode), got {rank}")
        if not link_id:
            raise ValueError("link_id must not be empty")
        self.link_id, self.rank, self.peer = link_id, rank, 1 - rank
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.timeout = timeout
        self.broken: str | None = None
        self.last_used = time.monotonic()
        self._store = store  # a client store must outlive the group
        prefixed = dist.PrefixStore(f"shoal/kv-link/{link_id}", store)
        if self.backend == "nccl":
            torch.cuda.set_device(self.device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
        # A first exchange proves both ends are up (and, on NCCL, creates the communicator now).
        hello = torch.tensor([rank], dtype=torch.int64, device=self.device)
        if rank == SENDER:
            self.send(hello, tag=0)
        else:
            self.recv(hello, tag=0)

    @classmethod
    def connect(cls, link_id: str, rank: int, host: str, port: int, *, device: torch.device | str = "cpu",
                timeout: timedelta = timedelta(seconds=30)) -> "KVLink":
        """Join the store at ``host:port`` as a client (the decode side, or a benchmark's second process)."""
        store = dist.TCPStore(host, port, None, is_master=False, timeout=timeout, use_libuv=True)
        return cls(link_id, rank, store, device=device, timeout=timeout)

    def send(self, data: torch.Tensor, tag: int) -> None:
        self._check_usable()
        self._wait(self.group.send([data.contiguous()], self.peer, tag), "send")

    def recv(self, out: torch.Tensor, tag: int) -> torch.Tensor:
        """Receive into ``out`` (contiguous, on this end's device) and return it."""
        self._check_usable()
        self._wait(self.group.recv([out], self.peer, tag), "recv")
        return out

    # -- posted operations (``pipeline.py`` keeps several chunks in flight) ------------------------
    def isend(self, data: torch.Tensor, tag: int):
        """Post a send and return its work at once; finish it with :meth:`wait`.

        ``data`` (contiguous) must stay unchanged until the send completes. On CUDA the send starts
        after the work the current stream holds now; ``work.wait()`` (torch's own) makes the current
        stream wait for it without blocking the host.
        """
        self._check_usable()
        if not data.is_contiguous():
            raise ValueError("isend needs a contiguous tensor (it must outlive the posted send)")
        return self.group.send([data], self.peer, tag)

    def irecv(self, out: torch.Tensor, tag: int):
        """Post a receive into ``out`` (contiguous, on this end's device); finish it with :meth:`wait`."""
        self._check_usable()
        if not out.is_contiguous():
            raise ValueError("irecv needs a contiguous output tensor")
        return self.group.recv([out], self.peer, tag)

    def wait(self, work, what: str = "transfer") -> None:
        """Block until a posted operation completes (at most ``timeout``); a failure breaks the link."""
        self._wait(work, what)

    def close(self) -> None:
        group, self.group = getattr(self, "group", None), None
        if group is not None and self.backend == "nccl":
            try:
                group.abort()  # frees the communicator; a pending operation on it fails instead of hanging
            except Exception:
                pass
        self._store = None

    @property
    def closed(self) -> bool:
        return self.group is None

    # -- plumbing -----------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.group is None:
            raise KVTransferError(f"KV link {self.link_id} is closed")
        if self.broken is not None:
            raise KVTransferError(f"KV link {self.link_id} failed earlier ({self.broken}); open a new one")

    def _wait(self, work, what: str) -> None:
        try:
            if self.backend == "nccl":
                start = time.monotonic()
                deadline = start + self.timeout.total_seconds()
                while not work.is_completed():
                    now = time.monotonic()
                    if now > deadline:
                        raise RuntimeError(f"timed out after {self.timeout.total_seconds():.0f} s")
                    if now - start > _SPIN_S:
                        time.sleep(_POLL_S)
                work.wait()
            else:
                work.wait(self.timeout)
        except RuntimeError as e:
            self.broken = f"{what}: {e}"
            raise KVTransferError(f"KV link {self.link_id}: {what} with the peer failed or timed out "
                                  f"(limit {self.timeout.total_seconds():.0f} s): {e}") from e
        self.last_used = time.monotonic()
