"""The scheduler on CPU with a fake cache size and a fake runner: budgets, chunking, preemption, abort."""

from __future__ import annotations

from shoal.workers.engine.core import EngineCore
from shoal.workers.engine.kv_cache_manager import KVCacheManager
from shoal.workers.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shoal.workers.engine.request import Request, RequestStatus
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.engine.scheduler import Scheduler, SchedulerConfig


class CountingRunner:
    """Samples token 7 for every request that caught up; records what each step computed."""

    def __init__(self):
        self.steps: list[SchedulerOutput] = []
        self.known: dict[str, int] = {}  # request id -> tokens the runner believes it has

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(sched)
        for rid in sched.preempted_request_ids | sched.finished_request_ids:
            self.known.pop(rid, None)
        for new in sched.new_requests:
            self.known[new.request_id] = len(new.token_ids)
        sampled = {}
        for new in sched.new_requests:
            assert new.num_computed_tokens + sched.num_scheduled_tokens[new.request_id] <= len(new.token_ids)
        for rid, n in sched.num_scheduled_tokens.items():
            done = next((c.num_computed_tokens for c in sched.cached_requests if c.request_id == rid),
                        next((x.num_computed_tokens for x in sched.new_requests if x.request_id == rid), None))
            if done + n == self.known[rid]:
                sampled[rid] = 7
                self.known[rid] += 1
        return ModelRunnerOutput(sampled)


def make(num_blocks=64, block_size=4, **cfg):
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_model_len=256, **cfg), kv)
    runner = CountingRunner()
    return EngineCore(sched, runner), sched, runner, kv


def run_all(core: EngineCore, limit: int = 500) -> list:
    outs = []
    for _ in range(limit):
        if not core.has_unfinished_requests():
            return outs
        outs += core.step()
    raise AssertionError("engine did not finish")


def test_token_budget_chunks_prefill_and_mixes_decode():
    core, sched, runner, kv = make(max_num_batched_tokens=10)
    core.add_request(Request("short", [1, 2, 3], SamplingParams(max_tokens=5)))
    core.add_request(Request("long", list(range(30)), SamplingParams(max_tokens=2)))
    run_all(core)
    for step in runner.steps:
        assert step.total_num_scheduled_tokens <= 10
    # step 1: short's prompt (3) + 7 tokens of long; then short decodes while long keeps prefilling
    assert runner.steps[0].num_scheduled_tokens == {"short": 3, "long": 7}
    assert runner.steps[1].num_scheduled_tokens == {"short": 1, "long": 9}
    kv.check_no_leak()


def test_max_num_seqs_limits_running():
    core, sched, runner, kv = make(max_num_seqs=2)
    for i in range(5):
        core.add_request(Request(f"r{i}", [1, 2, 3, i], SamplingParams(max_tokens=3)))
    run_all(core)
    assert max(len(s.num_scheduled_tokens) for s in runner.steps) == 2
    kv.check_no_leak()


def test_preemption_recomputes_and_everything_finishes():
    core, sched, runner, kv = make(num_blocks=8, block_size=4)
    for i in range(4):
        core.add_request(Request(f"r{i}", [i] * 6, SamplingParams(max_tokens=10)))
    outs = run_all(core)
    assert sched.stats.num_preemptions > 0
    per_request = {}
    for o in outs:
        per_request.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert {k: len(v) for k, v in per_request.items()} == {f"r{i}": 10 for i in range(4)}
    kv.check_no_leak()


def test_abort_frees_blocks_of_waiting_and_running_requests():
    core, sched, runner, kv = make(max_num_seqs=1)
    core.add_request(Request("a", list(range(8)), SamplingParams(max_tokens=50)))
    core.add_request(Request("b", list(range(8)), SamplingParams(max_tokens=50)))
    core.step()
    assert kv.num_held_blocks() > 0
    core.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert not core.has_unfinished_requests()
    kv.check_no_leak()
    sched_out = sched.schedule()
    assert sched_out.finished_request_ids == {"a", "b"}  # the runner is told to drop them


def test_priority_policy_admits_and_keeps_important_requests_first():
    core, sched, runner, kv = make(max_num_seqs=1, policy="priority")
    core.add_request(Request("low", [1, 2], SamplingParams(max_tokens=2), priority=5))
    core.add_request(Request("high", [3, 4], SamplingParams(max_tokens=2), priority=0))
    run_all(core)
    assert list(runner.steps[0].num_scheduled_tokens) == ["high"]


def test_prefix_hits_are_not_recomputed():
    core, sched, runner, kv = make(max_num_batched_tokens=64)
    prompt = list(range(40))
    core.add_request(Request("a", prompt, SamplingParams(max_tokens=1)))
    run_all(core)
    core.add_request(Request("b", prompt + [99], SamplingParams(max_tokens=1)))
    run_all(core)
    assert runner.steps[-1].num_scheduled_tokens == {"b": 1}  # 40 cached tokens skipped
    assert sched.stats.num_prefix_hits == 40


def test_stop_conditions():
    core, sched, runner, kv = make()
    core.add_request(Request("eos", [1], SamplingParams(max_tokens=9), eos_token_ids=frozenset({7})))
    core.add_request(Request("ignore", [1], SamplingParams(max_tokens=3, ignore_eos=True),
                             eos_token_ids=frozenset({7})))
    core.add_request(Request("min", [1], SamplingParams(max_tokens=9, min_tokens=2),
                             eos_token_ids=frozenset({7})))
    core.add_request(Request("stopid", [1], SamplingParams(max_tokens=9, stop_token_ids=[7])))
    outs = {o.request_id: o for o in run_all(core) if o.finish_reason}
    assert outs["eos"].finish_reason == "stop" and outs["eos"].stop_reason is None
    assert outs["ignore"].finish_reason == "length"
    assert outs["stopid"].stop_reason == 7
    lengths = {}
    for step in runner.steps:
        for rid in step.num_scheduled_tokens:
            lengths[rid] = lengths.get(rid, 0) + 1
    assert lengths["min"] == 2 and lengths["eos"] == 1
