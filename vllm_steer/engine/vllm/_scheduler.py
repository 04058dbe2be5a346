"""Engine core (``Scheduler``): a :class:`~vllm_steer.engine.runtime.SlotGate` skips a waiting request for
a step when its steering would need more distinct slots than the worker has — what the scheduler does
for ``max_loras``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

from vllm_steer.core.request import admission_keys
from vllm_steer.core.settings import SteerConfig
from vllm_steer.core.wire import DIGEST_KEY, ROUTE_KEY
from vllm_steer.engine.runtime import SlotGate
from vllm_steer.engine.vllm._common import PATCHED_ATTR

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["patch_scheduler"]


def _gate_of(scheduler: Any) -> SlotGate | None:
    gate: SlotGate | Literal[False] | None = scheduler.__dict__.get("_vllm_steer_gate", False)
    if gate is False:
        config = SteerConfig.resolve(scheduler.vllm_config.additional_config)
        gate = SlotGate(config.slot_budget(scheduler.scheduler_config.max_num_seqs)) if config.enabled else None
        scheduler._vllm_steer_gate = gate
    return gate


def _request_keys(request: Any) -> tuple[tuple[Any, ...], ...]:
    params = getattr(request, "sampling_params", None)
    return admission_keys(getattr(params, "extra_args", None), DIGEST_KEY, ROUTE_KEY) if params is not None else ()


def patch_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    original_schedule = Scheduler.schedule
    if getattr(original_schedule, PATCHED_ATTR, False):
        return

    @functools.wraps(original_schedule)
    def schedule(self: Scheduler, *args: Any, **kwargs: Any) -> SchedulerOutput:
        gate = _gate_of(self)
        if gate is None:
            return original_schedule(self, *args, **kwargs)
        gate.begin_step(self.finished_req_ids)
        output: SchedulerOutput | None = None
        try:
            output = original_schedule(self, *args, **kwargs)
        finally:
            new = (
                []
                if output is None
                else [(r.req_id, _request_keys(self.requests.get(r.req_id))) for r in output.scheduled_new_reqs]
            )
            gate.end_step(new, () if output is None else output.finished_req_ids)
        return output

    original_blocked = Scheduler._handle_blocked_waiting_request

    @functools.wraps(original_blocked)
    def _handle_blocked_waiting_request(self: Scheduler, request: Request) -> bool:
        ready = original_blocked(self, request)
        gate: SlotGate | None = self.__dict__.get("_vllm_steer_gate")
        if not ready or gate is None:
            return ready
        return gate.admit(request.request_id, _request_keys(request))

    setattr(schedule, PATCHED_ATTR, True)
    Scheduler.schedule = schedule
    Scheduler._handle_blocked_waiting_request = _handle_blocked_waiting_request
