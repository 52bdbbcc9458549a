"""``shoal bench kv-transfer``: KV block transfer bandwidth between two devices beside the link's own
send/recv ceiling, measured in the same run.

Two spawned processes, one device each: rank 0 is the prefill end (sender), rank 1 the decode end
(receiver), joined by a :class:`KVLink` (NCCL on GPUs, gloo on CPU) through a :class:`LinkStore` in
this process. Each end holds a paged KV cache of a model's shape, per layer (k, v) of
``[cache_blocks, block_size, kv_heads, head_dim]``; the sender's is random.

For each prompt length, the prompt's blocks sit at shuffled block ids on each side, and three
transfers of the same bytes are timed end to end as the receiver sees them:

- ``ceiling``: ``link.send``/``recv`` of one contiguous buffer (what the link itself can do);
- ``path``: ``gather_blocks`` -> ``send`` -> ``recv`` -> ``scatter_blocks``;
- ``pipelined``: ``pipeline.send_blocks``/``recv_blocks`` (chunks of layers, gather/scatter
  overlapping the wire).

A transfer's time runs from the sender's start to the receiver's device having finished the
scatter; both ends read CLOCK_MONOTONIC, one clock for every process of a host. Before each transfer
the receiver sends a "ready" message and then posts its receive; the sender, once it has the
message, waits ``_SETTLE_S`` before it starts the clock, so the receive is already waiting (the
link's completion polling would otherwise delay the receiver by up to a poll interval, a delay the
ceiling would pay in full and the path would hide behind its gather). ``late_posts`` in the JSON
counts the timed transfers where the receiver posted after the clock started anyway.

The first transfer of each kind is checked: the receiver's blocks must equal the sender's (a
benchmark that moves garbage is worthless). The ceiling's buffer is the reference, checked against
the sender's checksum; ``verified`` in each row says all three checks passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta

from .report import environment, format_table, write_json

DEFAULT_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
TARGET_GBPS, TARGET_PCT = 150.0, 80.0  # issue 6: >= 150 GB/s and >= 80% of the send/recv ceiling
METHODS = ("ceiling", "path", "pipelined")
_DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_KEY = "shoal/kv-bench"
_TAG = 7
_PARENT_LIMIT_S = 3600.0  # the children's link operations have deadlines; this only backs them up
_START_LIMIT_S = 300.0  # spawning, importing torch, CUDA and NCCL set-up, before the link opens
_SETTLE_S = 0.002  # > KVLink's completion poll interval (0.5 ms) plus posting a receive
_EXIT_GRACE_S = 2.0  # a crashing child posts its traceback just before exiting


@dataclass(frozen=True)
class KVBenchConfig:
    """One run, every default resolved (devices and dtype are concrete)."""

    devices: tuple[str, str] = ("cpu", "cpu")
    model_shape: str = "llama-3.1-8b"
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "float32"
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    iters: int = 10
    warmup: int = 2
    layers_per_chunk: int | None = 4  # None: no pipelined variant
    cache_blocks: int = 0  # 0: twice the largest prompt's blocks
    seed: int = 0
    timeout_s: float = 120.0

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first transfer of each kind is the one verified), "
                             f"got {self.warmup}")
        if not self.tokens or min(self.tokens) < 1:
            raise ValueError(f"tokens must be one or more counts >= 1, got {self.tokens}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.layers_per_chunk is not None and self.layers_per_chunk < 1:
            raise ValueError(f"layers_per_chunk must be >= 1, got {self.layers_per_chunk}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.cache_blocks == 0:
            object.__setattr__(self, "cache_blocks", 2 * self.blocks_for(max(self.tokens)))
        if self.cache_blocks < self.blocks_for(max(self.tokens)):
            raise ValueError(f"cache_blocks must hold the largest prompt's {self.blocks_for(max(self.tokens))} "
                             f"blocks, got {self.cache_blocks}")
        _check_devices(self.devices)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * _DTYPE_BYTES[self.dtype]

    def side_bytes(self) -> int:
        """Device memory one end needs: its cache, 3 whole-prompt buffers at most, the pipeline's ring."""
        largest = self.blocks_for(max(self.tokens)) * self.block_size * self.bytes_per_token
        ring = 0
        if self.layers_per_chunk is not None:
            ring = 2 * largest * min(self.layers_per_chunk, self.num_layers) // self.num_layers
        return self.cache_blocks * self.block_size * self.bytes_per_token + 3 * largest + ring


def _check_devices(devices: tuple[str, ...]) -> None:
    import torch

    if len(devices) != 2:
        raise ValueError(f"devices must name two devices (sender,receiver), got {devices}")
    a, b = (torch.device(d) for d in devices)
    if a.type != b.type or a.type not in ("cpu", "cuda"):
        raise ValueError(f"devices must be both cpu or both cuda (one link backend), got {devices}")
    if a.type == "cuda":
        if a.index is None or b.index is None or a.index == b.index:
            raise ValueError(f"devices must be two distinct GPUs such as cuda:0,cuda:1 (NCCL refuses two "
                             f"ranks on one GPU), got {devices}")
        count = torch.cuda.device_count()
        if max(a.index, b.index) >= count:
            raise ValueError(f"devices {devices} need {max(a.index, b.index) + 1} GPUs, {count} visible")


# -- command line ----------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from shoal.workers.models.presets import PRESETS

    p.add_argument("--devices", default="auto",
                   help="sender,receiver: cuda:0,cuda:1 (NCCL) or cpu,cpu (gloo); auto = the first two "
                        "GPUs when two are visible, else cpu,cpu (default: %(default)s)")
    p.add_argument("--model-shape", default="llama-3.1-8b", choices=sorted(PRESETS),
                   help="the KV shape (layers, KV heads, head_dim) of this preset (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--kv-heads", type=int, default=None, help="override the preset's number of KV heads")
    p.add_argument("--head-dim", type=int, default=None, help="override the preset's head_dim")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto",) + _DTYPES,
                   help="auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)),
                   help="comma-separated prompt lengths (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed transfers per size and kind (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed transfers first; the first is verified")
    p.add_argument("--layers-per-chunk", type=int, default=4,
                   help="layers per chunk of the pipelined variant (default: %(default)s)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the pipelined variant")
    p.add_argument("--cache-blocks", type=int, default=0,
                   help="blocks of each side's cache; 0 = twice the largest prompt's (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one link operation may take")
    p.add_argument("--result-file", default=None)


def config_from_args(args: argparse.Namespace) -> KVBenchConfig:
    import torch

    from shoal.workers.models.presets import PRESETS

    devices = args.devices
    if devices == "auto":
        devices = "cuda:0,cuda:1" if torch.cuda.device_count() >= 2 else "cpu,cpu"
    devices = tuple(d.strip() for d in devices.split(","))
    preset = PRESETS[args.model_shape]
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if devices[0].startswith("cuda") else "float32"
    try:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    except ValueError:
        raise ValueError(f"tokens must be comma-separated integers, got {args.tokens!r}") from None
    shape = {"num_layers": preset["num_hidden_layers"],
             "num_kv_heads": preset.get("num_key_value_heads", preset["num_attention_heads"]),
             "head_dim": preset.get("head_dim") or preset["hidden_size"] // preset["num_attention_heads"]}
    for field, given in (("num_layers", args.layers), ("num_kv_heads", args.kv_heads), ("head_dim", args.head_dim)):
        if given is not None:
            shape[field] = given
    return KVBenchConfig(
        devices=devices, model_shape=args.model_shape, **shape,
        block_size=args.block_size, dtype=dtype, tokens=tokens,
        iters=args.iters, warmup=args.warmup,
        layers_per_chunk=None if args.no_pipeline else args.layers_per_chunk,
        cache_blocks=args.cache_blocks, seed=args.seed, timeout_s=args.timeout)


def run_from_args(args: argparse.Namespace) -> dict:
    cfg = config_from_args(args)
    payload = run(cfg)
    columns = ["tokens", "MB", "ceiling_GBps", "path_GBps", "path_pct"]
    if cfg.layers_per_chunk is not None:
        columns += ["pipelined_GBps", "pipelined_pct"]
    columns += ["gather_ms", "scatter_ms", "verified"]
    shape = (f"{cfg.model_shape}: {cfg.num_layers} layers x {cfg.num_kv_heads} KV heads x {cfg.head_dim}, "
             f"{cfg.dtype}, block {cfg.block_size}")
    print(format_table(payload["results"], columns,
                       title=f"KV transfer {cfg.devices[0]} -> {cfg.devices[1]} ({payload['backend']}), {shape}"))
    if payload.get("copy_bandwidth_GBps"):
        print(f"device copy bandwidth on {cfg.devices[0]}: {payload['copy_bandwidth_GBps']:,.1f} GB/s "
              f"(bytes read + written)")
    met = [r["tokens"] for r in payload["results"] if r["meets_target"]]
    print(f"target >= {TARGET_GBPS:.0f} GB/s and >= {TARGET_PCT:.0f}% of the ceiling: "
          f"met at {', '.join(map(str, met)) or 'no size'} tokens")
    write_json(args.result_file, payload)
    bad = [r["tokens"] for r in payload["results"] if not r["verified"]]
    if bad:
        raise RuntimeError(f"the receiver's blocks differ from the sender's at {bad} tokens: "
                           f"the numbers above measure a broken transfer")
    return payload


# -- the parent: spawn the two ends, collect what they report ---------------------------------------

def run(cfg: KVBenchConfig) -> dict:
    """Run both ends in spawned processes; returns the JSON payload (rows under ``results``)."""
    import torch.multiprocessing as mp

    from shoal.workers.executor.kv_transfer.link import LinkStore, backend_for

    if cfg.devices[0] == "cpu":
        _check_host_memory(cfg)
    store = LinkStore(timeout=timedelta(seconds=cfg.timeout_s))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child_main, args=(rank, cfg, store.host, store.port), daemon=True,
                         name=f"shoal-kv-bench-{role}") for rank, role in enumerate(("sender", "receiver"))]
    try:
        for p in procs:
            p.start()
        reports = _wait_for(procs, store.store)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        store.close()
    sender, receiver = reports
    rows = receiver["rows"]
    for row in rows:
        row["gather_ms"] = sender["gather_ms"][str(row["tokens"])]
    return {"benchmark": "kv-transfer", "config": asdict(cfg), "devices": list(cfg.devices),
            "device_names": [sender["device_name"], receiver["device_name"]],
            "backend": backend_for(cfg.devices[0]), "bytes_per_token": cfg.bytes_per_token,
            "target": {"GBps": TARGET_GBPS, "pct_of_ceiling": TARGET_PCT},
            "copy_bandwidth_GBps": sender.get("copy_bandwidth_GBps"), "env": environment(), "results": rows}


def _wait_for(procs, store) -> list[dict]:
    """Both ends' reports; the first failure raises with the failing end's traceback."""
    start = time.monotonic()
    exited_at: dict[int, float] = {}
    while True:
        for rank, p in enumerate(procs):
            if store.check([f"{_KEY}/error/{rank}"]):
                err = json.loads(store.get(f"{_KEY}/error/{rank}"))
                exc = ValueError if err["type"] == "ValueError" else RuntimeError
                raise exc(f"kv-transfer {p.name} (rank {rank}) failed:\n{err['traceback'].rstrip()}")
        if all(p.exitcode == 0 for p in procs):
            break
        for rank, p in enumerate(procs):
            if p.exitcode not in (None, 0) and \
                    time.monotonic() - exited_at.setdefault(rank, time.monotonic()) > _EXIT_GRACE_S:
                raise RuntimeError(f"kv-transfer {p.name} (rank {rank}) exited with code {p.exitcode} "
                                   f"without reporting an error")
        elapsed = time.monotonic() - start
        if elapsed > _PARENT_LIMIT_S or (elapsed > _START_LIMIT_S and not store.check([f"{_KEY}/linked"])):
            raise RuntimeError(f"kv-transfer gave up after {elapsed:.0f} s "
                               f"({'running' if store.check([f'{_KEY}/linked']) else 'the link never opened'})")
        time.sleep(0.02)
    reports = []
    for rank, p in enumerate(procs):
        if not store.check([f"{_KEY}/done/{rank}"]):
            raise RuntimeError(f"kv-transfer {p.name} (rank {rank}) exited without a report")
        reports.append(json.loads(store.get(f"{_KEY}/done/{rank}")))
    return reports


def _check_host_memory(cfg: KVBenchConfig) -> None:
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    need = 2 * cfg.side_bytes()
    if need > 0.8 * avail:
        raise ValueError(f"the two ends need {need / 1e9:.1f} GB of host memory, {avail / 1e9:.1f} GB is "
                         f"available: pass fewer --tokens, fewer --layers or a smaller --cache-blocks")


# -- the children -----------------------------------------------------------------------------------

def _child_main(rank: int, cfg: KVBenchConfig, host: str, port: int) -> None:
    import torch.distributed as dist

    store = dist.TCPStore(host, port, None, is_master=False, timeout=timedelta(seconds=cfg.timeout_s),
                          use_libuv=True)
    try:
        report = _run_end(rank, cfg, store)
        store.set(f"{_KEY}/done/{rank}", json.dumps(report))
    except BaseException as exc:
        store.set(f"{_KEY}/error/{rank}", json.dumps({"type": type(exc).__name__,
                                                      "traceback": traceback.format_exc()}))
        sys.exit(1)


def _run_end(rank: int, cfg: KVBenchConfig, store) -> dict:
    import torch

    from shoal.workers.executor.kv_transfer.link import SENDER, KVLink

    device = torch.device(cfg.devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        free, _ = torch.cuda.mem_get_info(device)
        if cfg.side_bytes() > 0.95 * free:
            raise ValueError(f"{device} has {free / 1e9:.1f} GB free, this end needs {cfg.side_bytes() / 1e9:.1f} "
                             f"GB: pass fewer --tokens or a smaller --cache-blocks")
        device_name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the two ends share the cores
        device_name = "cpu"
    torch.manual_seed(cfg.seed + rank)
    dtype = getattr(torch, cfg.dtype)
    shape = (cfg.cache_blocks, cfg.block_size, cfg.num_kv_heads, cfg.head_dim)
    make = (lambda: torch.randn(shape, dtype=dtype, device=device)) if rank == SENDER else \
        (lambda: torch.zeros(shape, dtype=dtype, device=device))
    caches = [(make(), make()) for _ in range(cfg.num_layers)]  # k, v: [cache_blocks, block_size, heads, dim]
    link = KVLink("kv-bench", rank, store, device=device, timeout=timedelta(seconds=cfg.timeout_s))
    store.set(f"{_KEY}/linked", "1")
    try:
        end = (_Sender if rank == SENDER else _Receiver)(cfg, link, caches, device)
        report = {"device_name": device_name, **end.run()}
    finally:
        link.close()
    if rank == SENDER and device.type == "cuda":
        from . import ceilings

        del caches, end
        torch.cuda.empty_cache()
        report["copy_bandwidth_GBps"] = ceilings.copy_bandwidth() / 1e9
    return report


class _End:
    """What both ends share: the message sequence of one timed transfer, the block ids, timing."""

    def __init__(self, cfg: KVBenchConfig, link, caches, device):
        import torch

        self.cfg, self.link, self.caches, self.device = cfg, link, caches, device
        self.torch = torch
        self.ready = torch.zeros(1, dtype=torch.int64, device=device)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1000 * link.rank)
        self.methods = METHODS if cfg.layers_per_chunk is not None else METHODS[:2]

    def shuffled_ids(self, n: int) -> list[int]:
        """n distinct block ids scattered over the cache, in shuffled order (as a real block table)."""
        return self.torch.randperm(self.cfg.cache_blocks, generator=self.gen)[:n].tolist()

    def checksum(self, data) -> float:
        """Sum in float64, layer by layer (no float64 copy of the whole request)."""
        return sum(float(self.torch.sum(layer, dtype=self.torch.float64)) for layer in data)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def local_ms(self, fn) -> float:
        """Median milliseconds of an operation on this end alone."""
        for _ in range(self.cfg.warmup):
            fn()
        times = []
        for _ in range(self.cfg.iters):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3


class _Sender(_End):
    def run(self) -> dict:
        from shoal.workers.executor.kv_transfer import gather_blocks
        from shoal.workers.executor.kv_transfer.pipeline import send_blocks

        torch, link, caches = self.torch, self.link, self.caches
        gather_ms = {}
        for tokens in self.cfg.tokens:
            ids = self.shuffled_ids(self.cfg.blocks_for(tokens))
            ref = gather_blocks(caches, ids)  # [layers, 2, n, block_size, heads, dim]: what must arrive
            checksum = self.checksum(ref)
            send = {"ceiling": lambda: link.send(ref, _TAG),
                    "path": lambda: link.send(gather_blocks(caches, ids), _TAG),
                    "pipelined": lambda: send_blocks(link, caches, ids, _TAG, self.cfg.layers_per_chunk)}
            for method in self.methods:
                starts = []
                for _ in range(self.cfg.warmup + self.cfg.iters):
                    link.recv(self.ready, _TAG)
                    self.sync()
                    time.sleep(_SETTLE_S)
                    starts.append(time.monotonic())
                    send[method]()
                link.send(torch.tensor(starts + [checksum], dtype=torch.float64, device=self.device), _TAG)
            del ref
            gather_ms[str(tokens)] = self.local_ms(lambda: gather_blocks(caches, ids))
        return {"gather_ms": gather_ms}


class _Receiver(_End):
    def run(self) -> dict:
        return {"rows": [self.one_size(tokens) for tokens in self.cfg.tokens]}

    def one_size(self, tokens: int) -> dict:
        from shoal.workers.executor.kv_transfer import KVGeometry, gather_blocks, scatter_blocks
        from shoal.workers.executor.kv_transfer.pipeline import recv_blocks

        torch, link, caches, cfg = self.torch, self.link, self.caches, self.cfg
        n = cfg.blocks_for(tokens)
        ids = self.shuffled_ids(n)
        geo = KVGeometry.of(caches)
        expect = torch.zeros(geo.data_shape(n), dtype=geo.dtype, device=self.device)  # the ceiling's buffer
        buf = torch.empty_like(expect)
        recv = {"ceiling": lambda: link.recv(expect, _TAG),
                "path": lambda: scatter_blocks(caches, ids, link.recv(buf, _TAG)),
                "pipelined": lambda: recv_blocks(link, caches, ids, _TAG, cfg.layers_per_chunk)}
        row = {"tokens": tokens, "blocks": n, "MB": n * cfg.block_size * cfg.bytes_per_token / 1e6}
        verified = True
        for method in self.methods:
            if method != "ceiling":
                self.clear(ids)  # what the check finds must have come in this method's transfer
            posted, ends = [], []
            for i in range(cfg.warmup + cfg.iters):
                link.send(self.ready, _TAG)
                posted.append(time.monotonic())
                recv[method]()
                self.sync()
                ends.append(time.monotonic())
                if i == 0 and method != "ceiling":
                    verified &= bool(torch.equal(gather_blocks(caches, ids), expect))
            stamps = torch.empty(len(ends) + 1, dtype=torch.float64, device=self.device)
            starts = link.recv(stamps, _TAG).tolist()
            checksum = starts.pop()
            if method == "ceiling":  # ``expect`` is what every later check compares against
                got = self.checksum(expect)
                verified &= math.isclose(got, checksum, rel_tol=1e-6, abs_tol=1e-6) and checksum != 0
            row["late_posts"] = row.get("late_posts", 0) + sum(p > s for p, s in
                                                               list(zip(posted, starts))[cfg.warmup:])
            seconds = statistics.median([e - s for s, e in zip(starts, ends)][cfg.warmup:])
            row[f"{method}_ms"] = seconds * 1e3
            row[f"{method}_GBps"] = row["MB"] / 1e3 / seconds
        for method in self.methods[1:]:
            row[f"{method}_pct"] = 100 * row[f"{method}_GBps"] / row["ceiling_GBps"]
        row["scatter_ms"] = self.local_ms(lambda: scatter_blocks(caches, ids, buf))
        row["verified"] = verified
        best = max(row[f"{m}_GBps"] for m in self.methods[1:])
        row["meets_target"] = best >= TARGET_GBPS and 100 * best / row["ceiling_GBps"] >= TARGET_PCT
        return row

    def clear(self, ids: list[int]) -> None:
        idx = self.torch.tensor(ids, dtype=self.torch.long, device=self.device)
        for k, v in self.caches:
            k.index_fill_(0, idx, 0)
            v.index_fill_(0, idx, 0)
