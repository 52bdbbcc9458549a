"""``pipeline.send_blocks`` / ``recv_blocks`` over a real gloo ``KVLink`` (both ends in one process, on
two threads): the receiver's blocks equal the sender's for odd layer, chunk and block counts, blocks
not named stay untouched, and the link stays in step for the next transfer."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch

from shoal.workers.executor.kv_transfer import gather_blocks
from shoal.workers.executor.kv_transfer.link import RECEIVER, SENDER, KVLink, LinkStore
from shoal.workers.executor.kv_transfer.pipeline import layer_chunks, recv_blocks, send_blocks

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 5, 12, 4, 2, 8


def make_caches(fill: bool, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
    make = (lambda: torch.randn(shape, generator=g)) if fill else (lambda: torch.zeros(shape))
    return [(make(), make()) for _ in range(LAYERS)]


def both_ends(sender_fn, receiver_fn, timeout_s: float = 20.0) -> None:
    """Run the two ends on two threads; re-raise the first error of either."""
    errors: list[BaseException] = []

    def guard(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(fn,)) for fn in (sender_fn, receiver_fn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a link end hung"
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def links():
    store = LinkStore()
    ends: dict[int, KVLink] = {}

    def open_end(rank):  # each end its own store client: one client's blocking wait would hold up the other
        ends[rank] = KVLink.connect("pipeline-test", rank, store.host, store.port, timeout=timedelta(seconds=10))

    both_ends(lambda: open_end(SENDER), lambda: open_end(RECEIVER))
    yield ends[SENDER], ends[RECEIVER]
    for link in ends.values():
        link.close()
    store.close()


def test_layer_chunks_cover_every_layer_once():
    assert layer_chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert layer_chunks(3, 7) == [(0, 3)]
    with pytest.raises(ValueError, match="layers_per_chunk must be >= 1"):
        layer_chunks(3, 0)


@pytest.mark.parametrize("layers_per_chunk", [1, 2, 3, 5, 7])
def test_received_blocks_equal_the_sent_ones(links, layers_per_chunk):
    send_link, recv_link = links
    src, dst = make_caches(fill=True), make_caches(fill=False)
    src_ids, dst_ids = [9, 2, 7, 0, 11, 4, 5], [3, 10, 1, 8, 6, 0, 11]  # 7 blocks, scattered
    both_ends(lambda: send_blocks(send_link, src, src_ids, 1, layers_per_chunk),
              lambda: recv_blocks(recv_link, dst, dst_ids, 1, layers_per_chunk))
    assert torch.equal(gather_blocks(dst, dst_ids), gather_blocks(src, src_ids))
    untouched = [b for b in range(BLOCKS) if b not in dst_ids]
    assert not gather_blocks(dst, untouched).any()
    # The link is still in step: a plain transfer right after arrives intact.
    probe = torch.arange(6.0)
    out = torch.empty(6)
    both_ends(lambda: send_link.send(probe, tag=2), lambda: recv_link.recv(out, tag=2))
    assert torch.equal(out, probe)


def test_no_blocks_moves_nothing_and_keeps_the_link_in_step(links):
    send_link, recv_link = links
    src, dst = make_caches(fill=True), make_caches(fill=False)
    both_ends(lambda: send_blocks(send_link, src, [], 3, 2), lambda: recv_blocks(recv_link, dst, [], 3, 2))
    both_ends(lambda: send_blocks(send_link, src, [1], 4, 2), lambda: recv_blocks(recv_link, dst, [5], 4, 2))
    assert torch.equal(gather_blocks(dst, [5]), gather_blocks(src, [1]))


def test_bad_chunking_is_refused_before_anything_is_posted(links):
    send_link, _ = links
    with pytest.raises(ValueError, match="layers_per_chunk must be >= 1"):
        send_blocks(send_link, make_caches(fill=True), [0, 1], 5, 0)
    assert send_link.broken is None
