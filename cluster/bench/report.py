"""What every ``shoal bench`` command shares: the run's environment, a printed table, a JSON file."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any, Sequence


def environment() -> dict[str, Any]:
    import torch

    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def engine_settings(engine) -> dict[str, Any]:
    """The settings an ``LLMEngine`` actually runs with (after its defaults and GPU sizing), so a
    benchmark's JSON can be compared with another run's without its log."""
    from shoal.workers.device import kernel_set, torch_device

    sched = engine.scheduler.config
    runner = engine.runner
    graphs = getattr(runner, "graphs", None)
    cfg = engine.config
    out = {
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_model_len": engine.max_model_len,
        "enable_chunked_prefill": sched.enable_chunked_prefill,
        "scheduling_policy": sched.policy,
        "async_scheduling": sched.async_scheduling,
        "block_size": cfg.block_size,
        "num_kv_blocks": engine.num_kv_blocks,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
        "kernels": kernel_set(cfg),
        "device": str(torch_device(cfg)),
        "cuda_graphs": graphs is not None,
        "cuda_graph_sizes": sorted(graphs.graphs) if graphs is not None else [],
    }
    mode = getattr(graphs, "mode", None)
    if mode is not None:
        out["cuda_graph_mode"] = mode
    return out


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str = "") -> str:
    """A plain aligned table; floats get 4 significant digits (or thousands separators when large)."""
    if not rows:
        return f"{title}\n(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    out = [title] if title else []
    out += [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def write_json(path: str | Path | None, payload: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
