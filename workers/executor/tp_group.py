"""Tensor-parallel ranks on one machine: the process group, what each rank runs, and rank 0's executor.

Rank 0 lives in the engine's process and runs the scheduler. Each step it broadcasts a call (the
``SchedulerOutput``, pickled) on a gloo control group, then makes the same call itself; every rank
runs the same ``TPRank`` method in the same order, so their collectives line up. Every rank samples
from the same all-gathered logits with identically seeded generators; rank 0's tokens are the ones
used, and they ride along with the next step so a worker that ever disagreed adopts them (and counts
it) before its next forward.

Failure never hangs rank 0: a dead peer closes its sockets, which gloo reports at once; a hung peer
trips the data-plane collective timeout; a worker that raises writes its traceback to the rendezvous
store, and rank 0 quotes it. Workers wait on the control group without a practical time limit
(rank 0 may idle for days); if rank 0 dies, its sockets close and they exit.

``run_worker`` is a non-zero rank's whole life and does not care how its process was started: here
``torch.multiprocessing`` spawns it, a Ray actor can call it the same way.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import weakref
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (see below)
import torch.multiprocessing as mp

from shoal.workers.config import EngineConfig
from shoal.workers.device import kernel_set, resolve_dtype, torch_device
from shoal.workers.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shoal.workers.models.config import ModelConfig
from shoal.workers.models.loader import ModelSource, resolve_model
from shoal.workers.models.ops import kernel_ops

from .kv_transfer.import_blocks import KVGeometry, gather_blocks, scatter_blocks
from .model_runner import ModelRunner, RunnerConfig, allocate_kv_caches
from .sampler import Sampler, make_generator
from .tensor_parallel import load_model_shard, tp_layout

log = logging.getLogger(__name__)

# torch.distributed.nn binds ``group.WORLD`` as a default argument when first imported, and torch
# imports it lazily (through torch._dynamo, e.g. on the first meta-device op of a shard build). Imported
# while our group exists it would pin the group, and the rendezvous port, for the life of the process;
# imported above, before any group exists, it binds nothing.

CONTROL_TIMEOUT = timedelta(days=365)  # a worker waits for rank 0's next call however long it idles
_KEY = "shoal/tp"  # prefix of the rendezvous store keys: ready/<rank>, error/<rank>, diverged/<rank>


class TPWorkerError(RuntimeError):
    """A tensor-parallel rank failed; the group is unusable and the engine must be rebuilt."""


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the ranks of one group meet; plain data, so any launcher can hand it to a worker."""

    host: str
    port: int  # the TCPStore rank 0 hosts
    world_size: int
    backend: str  # "gloo" on CPU, "nccl" on CUDA
    collective_timeout_s: float


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = torch_device(config)
    return torch.device("cuda", rank) if device.type == "cuda" else device


class TPGroup:
    """This process's membership: the data group (the default one: gloo or NCCL) and a gloo control group."""

    def __init__(self, rank: int, rdv: Rendezvous, store: dist.Store):
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group: "
                               "one tensor-parallel engine per process")
        self.rank, self.world_size = rank, rdv.world_size
        dist.init_process_group(rdv.backend, store=store, rank=rank, world_size=rdv.world_size,
                                timeout=timedelta(seconds=rdv.collective_timeout_s))
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    def broadcast(self, obj=None):
        """Rank 0 sends ``obj``; every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def max_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def destroy(self, abort: bool = False) -> None:
        """Leave the group. ``abort`` after a failure: NCCL's orderly destroy can wait forever on a
        communicator a dead or stuck peer shares, so tear it down without waiting."""
        self.control = None  # a live group object keeps the rendezvous store (and its port) open
        if not dist.is_initialized():
            return
        if abort and dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()


class TPRank:
    """One rank's shard and runner. Rank 0 and the workers call these methods in lockstep."""

    # What rank 0 may broadcast.
    CALLS = frozenset({"profile_peak_memory", "init_runner", "execute", "gather_kv", "scatter_kv"})

    def __init__(self, config: EngineConfig, group: TPGroup, source: ModelSource | None = None):
        self.config, self.group = config, group
        self.device = rank_device(config, group.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model = load_model_shard(
            source or resolve_model(config.model), dtype=self.dtype, device=self.device,
            ops=kernel_ops(kernel_set(config)), rank=group.rank, world_size=group.world_size,
            load_format=config.load_format, seed=config.seed)
        self.runner: ModelRunner | None = None
        self.num_diverged = 0  # tokens where this rank's sampler disagreed with rank 0's

    def profile_peak_memory(self, runner_cfg: RunnerConfig) -> int:
        """Peak bytes of one largest step, max over ranks (CUDA only; every rank probes: collectives)."""
        kv = allocate_kv_caches(self.model, 1, runner_cfg.block_size, self.dtype, self.device)
        probe = ModelRunner(self.model, kv, replace(runner_cfg, cuda_graphs=False), self.device)
        peak = probe.profile_peak_memory()
        del probe, kv
        torch.cuda.empty_cache()
        return self.group.max_over_ranks(peak)

    def init_runner(self, runner_cfg: RunnerConfig, num_blocks: int) -> None:
        kv = allocate_kv_caches(self.model, num_blocks, runner_cfg.block_size, self.dtype, self.device)
        # One shared seed for unseeded rows on every rank: same logits + same draws = same tokens.
        sampler = Sampler(make_generator(self.config.seed, self.device))
        self.runner = ModelRunner(self.model, kv, runner_cfg, self.device, sampler)

    def execute(self, sched: SchedulerOutput, rank0_tokens: dict[str, int]) -> ModelRunnerOutput:
        self._adopt(rank0_tokens)
        return self.runner.execute(sched)

    # -- KV blocks as whole-model tensors (disaggregated serving moves them between engines) ------------
    def gather_kv(self, block_ids: list[int]) -> torch.Tensor | None:
        """Rank 0 gets the blocks with every KV head: [layers, 2, n, block_size, kv_heads, head_dim];
        the others return None. Each KV head comes from its first holder (a head two ranks share is
        the same on both)."""
        local = gather_blocks(self.runner.kv_caches, block_ids)  # [..., kv_slots_per_rank, head_dim]
        shards = [torch.empty_like(local) for _ in range(self.group.world_size)]
        dist.all_gather(shards, local)  # the data group: NCCL on GPU moves device memory directly
        if self.group.rank != 0:
            return None
        holder = {}  # KV head -> (rank, slot) of its first holder
        for r, lay in enumerate(self._layouts()):
            for slot, h in enumerate(lay.kv_heads):
                holder.setdefault(h, (r, slot))
        where = [holder[h] for h in range(self.model.config.num_key_value_heads)]
        heads = [shards[r][..., slot, :] for r, slot in where]
        return torch.stack(heads, dim=-2).contiguous()

    def scatter_kv(self, block_ids: list[int], shape: tuple[int, ...], data: torch.Tensor | None = None) -> None:
        """Write whole-model blocks (``data`` on rank 0, broadcast to the others) into each rank's heads."""
        if data is None:
            data = torch.empty(shape, dtype=self.dtype, device=self.device)
        else:
            data = data.to(self.device)
        dist.broadcast(data, src=0)
        slots = torch.tensor(self._layouts()[self.group.rank].kv_heads, device=data.device)
        scatter_blocks(self.runner.kv_caches, block_ids, data.index_select(-2, slots))

    def release_graphs(self) -> None:
        """Drop the CUDA graphs before the group goes: graphs that captured NCCL collectives keep the
        communicator busy, and destroying it under them waits forever."""
        if self.runner is not None and self.runner.graphs is not None:
            self.runner.graphs = None
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _layouts(self) -> list:
        cfg = self.model.config
        return [tp_layout(cfg, r, self.group.world_size) for r in range(self.group.world_size)]

    def _adopt(self, rank0_tokens: dict[str, int]) -> None:
        """Make the last sampled token of each request rank 0's, before it is fed back as input."""
        for rid, token in rank0_tokens.items():
            state = self.runner.requests.get(rid)
            if state is not None and state.token_ids[-1] != token:
                state.token_ids[-1] = token
                self.num_diverged += 1
                log.warning("rank %d sampled differently from rank 0 for %s", self.group.rank, rid)


def serve(rank: TPRank) -> None:
    """A worker's loop: run each call rank 0 broadcasts, until it broadcasts None (shutdown)."""
    while (call := rank.group.broadcast()) is not None:
        method, args = call
        if method not in TPRank.CALLS:
            raise ValueError(f"rank 0 broadcast an unknown call {method!r}")
        getattr(rank, method)(*args)


def run_worker(config: EngineConfig, rank: int, rdv: Rendezvous) -> None:
    """Rank ``rank`` (>= 1): join the group, load the shard, serve rank 0 until shutdown.

    Any failure is written to the store under ``error/<rank>`` before it propagates, so rank 0 can say
    what went wrong rather than only that a socket closed.
    """
    store = dist.TCPStore(rdv.host, rdv.port, rdv.world_size, is_master=False,
                          timeout=timedelta(seconds=rdv.collective_timeout_s))
    store.set(f"{_KEY}/ready/{rank}", "1")
    group = None
    try:
        group = TPGroup(rank, rdv, store)
        worker = TPRank(config, group)
        serve(worker)
        worker.release_graphs()
        store.set(f"{_KEY}/diverged/{rank}", str(worker.num_diverged))
    except BaseException:
        try:
            store.set(f"{_KEY}/error/{rank}", traceback.format_exc())
        except Exception:
            pass  # rank 0 (the store's host) is gone; nobody is left to tell
        raise
    finally:
        if group is not None:
            group.destroy()


def _spawned_worker(config: EngineConfig, rank: int, rdv: Rendezvous, num_threads: int) -> None:
    if torch_device(config).type == "cpu":
        torch.set_num_threads(num_threads)  # N ranks share the machine's cores
    run_worker(config, rank, rdv)


class MultiprocTPExecutor:
    """Rank 0 of a ``tensor_parallel_size``-way group whose other ranks are spawned local processes.

    ``execute(sched) -> ModelRunnerOutput`` is ``ModelRunner``'s signature, so ``EngineCore`` drives it
    unchanged. Life cycle: construct (workers start, every rank loads its shard; ``self.model`` is rank
    0's), optionally ``profile_peak_memory``, ``init_runners``, ``execute`` per step, ``shutdown``.
    """

    def __init__(self, config: EngineConfig, source: ModelSource | None = None, *,
                 collective_timeout_s: float = 300.0, start_timeout_s: float = 120.0):
        ws = config.tensor_parallel_size
        source = source or resolve_model(config.model)
        tp_layout(ModelConfig.from_hf(source.hf_config), 0, ws)  # a model that cannot split fails here
        device = torch_device(config)
        if device.type == "cuda" and (device.index not in (None, 0) or torch.cuda.device_count() < ws):
            raise ValueError(f"tensor_parallel_size={ws} uses cuda:0..cuda:{ws - 1}: device must be 'cuda' "
                             f"and {ws} GPUs visible (got device={config.device!r}, "
                             f"{torch.cuda.device_count()} GPUs)")
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group: "
                               "one tensor-parallel engine per process")
        self.world_size = ws
        self._failure: str | None = None
        self._rank0_fault = False  # the failure was rank 0's own exception, no worker reported anything
        self._last_sampled: dict[str, int] = {}
        self.group: TPGroup | None = None
        self.rank: TPRank | None = None
        self.num_diverged: dict[int, int] = {}
        self._store = dist.TCPStore("127.0.0.1", 0, ws, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=collective_timeout_s))
        self.port = self._store.port  # port 0: the OS picks a free one, no race with other groups
        rdv = Rendezvous("127.0.0.1", self.port, ws, "nccl" if device.type == "cuda" else "gloo",
                         collective_timeout_s)
        self.processes = self._spawn_workers(config, rdv)
        # Cleans up if this object is dropped without shutdown() (or at interpreter exit).
        self._finalizer = weakref.finalize(self, _abandon, list(self.processes))
        try:
            self._wait_ready(start_timeout_s)
            self.group = TPGroup(0, rdv, self._store)
            self.rank = TPRank(config, self.group, source)
        except BaseException as exc:
            err = self._fail(exc)
            self.shutdown()
            if self._rank0_fault:
                raise  # rank 0's own error (a bad checkpoint, say) as it was raised
            raise err from exc

    def _spawn_workers(self, config: EngineConfig, rdv: Rendezvous) -> list:
        threads = max(1, (os.cpu_count() or 1) // rdv.world_size)
        # Each rank gets its share of the cores: oversubscribed OpenMP threads spinning in one rank
        # starve the others at every all-reduce (steps then take 10x longer on a 2-core machine).
        self._saved_threads = torch.get_num_threads() if rdv.backend == "gloo" else None
        if self._saved_threads is not None:
            torch.set_num_threads(threads)
        ctx = mp.get_context("spawn")
        processes = [ctx.Process(target=_spawned_worker, args=(config, r, rdv, threads), daemon=True,
                                 name=f"shoal-tp-rank{r}") for r in range(1, rdv.world_size)]
        for p in processes:
            p.start()
        return processes

    @property
    def model(self):
        return self.rank.model

    @property
    def runner(self) -> ModelRunner | None:
        return self.rank.runner

    # -- the calls every rank makes ------------------------------------------------------------------
    def profile_peak_memory(self, runner_cfg: RunnerConfig) -> int:
        return self._call("profile_peak_memory", runner_cfg)

    def init_runners(self, runner_cfg: RunnerConfig, num_blocks: int) -> None:
        self._call("init_runner", runner_cfg, num_blocks)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        out = self._call("execute", sched, self._last_sampled)
        self._last_sampled = out.sampled_token_ids
        return out

    def gather_kv(self, block_ids: list[int]) -> torch.Tensor:
        return self._call("gather_kv", block_ids)

    def scatter_kv(self, block_ids: list[int], shape: tuple, data: torch.Tensor) -> None:
        """Every rank writes its heads of ``data`` (rank 0 holds it; the others receive it by shape)."""
        self._call("scatter_kv", block_ids, shape, local_extra=(data,))

    @property
    def block_io(self) -> "TPBlockIO":
        return TPBlockIO(self)

    def _call(self, method: str, *args, local_extra: tuple = ()):
        """Every rank runs ``method(*args)``; rank 0 also passes ``local_extra`` (data not worth pickling)."""
        if self._failure is not None:
            raise TPWorkerError(f"the tensor-parallel group is down ({self._failure}); rebuild the engine")
        if any(p.exitcode is not None for p in self.processes):
            raise self._fail(None)
        try:
            self.group.broadcast((method, args))
            return getattr(self.rank, method)(*args, *local_extra)
        except BaseException as exc:  # the ranks are out of lockstep now, whatever the cause
            err = self._fail(exc)
            if isinstance(exc, Exception):
                raise err from exc
            raise

    # -- failure and shutdown ------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> None:
        """Until every worker reached the store; a worker that dies first fails this at once."""
        deadline = time.monotonic() + timeout_s
        keys = [f"{_KEY}/ready/{r}" for r in range(1, self.world_size)]
        while not self._store.check(keys):
            if any(p.exitcode is not None for p in self.processes):
                raise TPWorkerError("a tensor-parallel worker exited during start-up")
            if time.monotonic() > deadline:
                raise TPWorkerError(f"tensor-parallel workers did not start within {timeout_s:.0f} s")
            time.sleep(0.02)

    def _fail(self, exc: BaseException | None) -> TPWorkerError:
        """Mark the group down and explain why, quoting a worker's traceback when one was posted."""
        deadline = time.monotonic() + 2.0  # a crashing worker needs a moment to post its error and exit
        reasons: list[str] = []
        while not reasons:
            for r, p in enumerate(self.processes, start=1):
                if self._store.check([f"{_KEY}/error/{r}"]):
                    tb = self._store.get(f"{_KEY}/error/{r}").decode(errors="replace").rstrip()
                    reasons.append(f"rank {r} raised:\n{tb}")
                elif p.exitcode is not None:
                    reasons.append(f"rank {r} exited with code {p.exitcode}")
            if exc is None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self._rank0_fault = not reasons
        if not reasons:
            reasons.append(f"rank 0 failed: {type(exc).__name__}: {exc}")
        self._failure = "; ".join(reasons)
        return TPWorkerError(f"tensor-parallel group failed: {self._failure}")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (politely, then by force), leave the process group, close the store's port."""
        if self._store is None:
            return
        if self._failure is None and self.group is not None:
            try:
                self.group.broadcast(None)
                deadline = time.monotonic() + timeout_s
                for p in self.processes:
                    p.join(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
        _reap(self.processes)  # after a failure, workers may be stuck in a collective: no point waiting
        for r in range(1, self.world_size):
            key = f"{_KEY}/diverged/{r}"
            if self._store.check([key]):
                self.num_diverged[r] = int(self._store.get(key))
        if self.rank is not None and self._failure is None:
            self.rank.release_graphs()
        if self.group is not None:
            self.group.destroy(abort=self._failure is not None)
        self._finalizer.detach()
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
        self._store = None  # the last reference: the TCPStore server closes its port


class TPBlockIO:
    """``CacheBlockIO``'s interface over a tensor-parallel engine: whole-model blocks in and out, each
    rank reading or writing its own heads (so a TP=1 prefill can feed a TP=2 decode and back)."""

    def __init__(self, executor: MultiprocTPExecutor):
        self.executor = executor
        rank = executor.rank
        cfg = rank.model.config
        self.device = rank.device
        self.geometry = KVGeometry(cfg.num_hidden_layers, executor.runner.block_size, cfg.num_key_value_heads,
                                   cfg.head_dim, rank.dtype)

    def gather(self, block_ids) -> torch.Tensor:
        return self.executor.gather_kv(list(block_ids))

    def scatter(self, block_ids, data: torch.Tensor) -> None:
        expected = self.geometry.data_shape(len(block_ids))
        if tuple(data.shape) != expected or data.dtype != self.geometry.dtype:
            raise ValueError(f"KV data has shape {tuple(data.shape)} / {data.dtype}, the cache expects "
                             f"{expected} / {self.geometry.dtype}")
        self.executor.scatter_kv(list(block_ids), expected, data)


def _reap(processes: list) -> None:
    """Terminate, then kill, whatever is still running; join everything."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()


def _abandon(processes: list) -> None:
    """An executor dropped without shutdown: reap its workers and leave the group it made."""
    _reap(processes)
    if dist.is_initialized():  # ours: TPGroup refuses to start in a process that already had one
        if dist.get_backend() == "nccl":  # the peers are gone: an orderly destroy would wait for them
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
