"""The steering runtime of one model process: slots, static buffers, the per-step token map, the custom op.

Modelled on vLLM's LoRA support (``vllm/lora/``):

* **Slots.** Each distinct (profile, category selection) in flight occupies one
  of ``max_slots`` fixed slots. A slot holds, per hook *site* (layer × hook
  kind), the basis ``[b1, b2]``, the method, gain and threshold. Requests that
  share a profile share its slot; their angle and scale travel per token.
* **Static buffers.** Every tensor the op reads is allocated once at start and
  filled in place, so shapes and addresses never change: no recompilation,
  CUDA-graph safe, and loading a profile is a copy into a free slot.
* **A token → slot map built once per step** (``begin_step``), like LoRA's
  ``token_lora_mapping``: prefill chunks, decodes and padding all follow from
  the number of tokens each request has in the step; padding maps to ``-1``.
* **A custom op**, ``torch.ops.vllm_steer.delta(h, site)``, that torch.compile
  keeps opaque: compiled graphs call it at every step and it reads the buffers.
  It returns the correction, which the hook adds (``h + delta``), so unsteered
  rows get ``+ 0`` and stay bit-identical.
* **Which op runs** (:mod:`vllm_steer.engine.fused`). Inside a CUDA-graph capture the
  general op, which must serve any mix: on CUDA one Triton kernel per site (by
  default), compiled in the eager warm-up steps vLLM runs before each capture,
  never inside one. Outside captures the host knows the step's mix: sites no
  steered token uses return zeros; on CUDA the Triton kernel serves the rest;
  otherwise a site steered by one method runs that method's short formula, and a
  site two methods share runs the general op (torch.compile'd if ``compiled``).

Nothing here imports vLLM; :mod:`vllm_steer.engine.vllm` feeds it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_steer.core.gates import GATE_HOOK, fired_gates, route_of
from vllm_steer.core.methods import METHODS
from vllm_steer.core.ops import Method, single_method_deltas, token_deltas
from vllm_steer.core.profile import Profile
from vllm_steer.core.request import ResolvedSteering, route_targets
from vllm_steer.core.settings import FusedChoice
from vllm_steer.engine.fused import choose_fused_op
from vllm_steer.engine.gating import DecidingToken, ForcedToken, GateDecision, GateTable, RowsExhaustedError

__all__ = [
    "Site",
    "SlotsExhaustedError",
    "MissingSitesError",
    "RowsExhaustedError",
    "GateDecision",
    "SteeringRuntime",
    "SlotGate",
    "sites_for_profiles",
    "every_site",
    "get_runtime",
    "set_runtime",
]

logger = logging.getLogger("vllm_steer")


@dataclass(frozen=True, order=True)
class Site:
    """One place in the network where the op runs: a decoder layer and a hook kind."""

    layer: int
    kind: str

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.kind}"


def sites_for_profiles(profiles: Mapping[str, Profile]) -> list[Site]:
    """Every site some profile steers or gates at, sorted; hooks are installed only there."""
    sites = {Site(layer, kind) for p in profiles.values() for layer in p.spec.layers for kind in p.spec.hooks}
    sites |= {Site(layer, GATE_HOOK) for p in profiles.values() if p.spec.gating for layer in p.spec.gating.layers}
    return sorted(sites)


def every_site(num_layers: int) -> list[Site]:
    """All hook sites of a model: hooking them all at start lets any profile be hot-loaded later."""
    kinds = sorted({kind for method in METHODS.values() for kind in method.hooks})
    return sorted(Site(layer, kind) for layer in range(num_layers) for kind in kinds)


FINISHED_DECISIONS = 4096
"""Finished gated requests whose decision a runtime keeps for the server to read (the oldest go first)."""


class SlotsExhaustedError(RuntimeError):
    pass


class MissingSitesError(RuntimeError):
    """A hot-loaded profile needs a hook site the engine was not started with."""


@dataclass
class _Slot:
    key: tuple[object, ...] | None = None
    refs: int = 0
    active_sites: frozenset[int] = frozenset()
    method: Method = Method.NONE
    decide_site: int | None = None
    """Gated profiles: the site of the deepest gate, where a request's decision becomes final."""
    gate_of: tuple[str, str, str, bool] = ("", "", "", False)
    """Gated profiles: the profile id, the gate action, the profile version and whether the slot routes (for the
    decisions' records)."""


@dataclass
class _Binding:
    slot: int
    cos: float
    sin: float
    scale: float
    row: int | None = None
    """Gated requests: the decision row (:class:`~vllm_steer.engine.gating.GateTable`)."""
    decided: bool = False
    """Its last prompt token has been scheduled (the decision is on the device)."""
    refusal: tuple[int, ...] | None = None
    """Gate action ``refuse``: the refusal's token ids, ending with the request's end-of-sequence token."""
    routes: tuple[int, ...] = ()
    """A routing request: the slots of the categories its gates may route it to (it holds a reference on each)."""


class SteeringRuntime:
    """Per-process steering state; one per model runner."""

    def __init__(
        self,
        profiles: Mapping[str, Profile],
        sites: Sequence[Site],
        hidden_size: int,
        max_slots: int,
        max_tokens: int,
        device: torch.device | str = "cpu",
        fused: FusedChoice | bool | None = None,
        max_requests: int = 16,
        tokenize: Callable[[str], Sequence[int]] | None = None,
    ):
        """``tokenize``: the served model's tokenizer (text → ids, no special tokens), for refusal texts."""
        self.profiles = dict(profiles)
        self._tokenize = tokenize
        self._refusal_ids: dict[str, tuple[int, ...]] = {}
        self._finished: OrderedDict[
            str, tuple[tuple[str, str, str, bool], bool, tuple[tuple[str, ...], torch.Tensor]]
        ] = OrderedDict()
        """Finished gated requests (most recent :data:`FINISHED_DECISIONS`): profile, action, decided, row copy."""
        self.sites = list(sites)
        self.site_ids = {site: i for i, site in enumerate(self.sites)}
        # Every version ever loaded, by content digest: a request validated against a version keeps
        # it, even if the profile is replaced or removed (hot reload) before the request is scheduled.
        self._versions: dict[str, Profile] = {p.digest: p for p in self.profiles.values()}
        self.hidden_size = hidden_size
        self.max_slots = max_slots
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        n_sites = len(self.sites)
        f32, dev = torch.float32, self.device
        # Per site × slot: what the op does there.
        self.bases = torch.zeros(n_sites, max_slots, 2, hidden_size, dtype=f32, device=dev)
        self.methods = torch.zeros(n_sites, max_slots, dtype=torch.int64, device=dev)
        self.gains = torch.zeros(n_sites, max_slots, dtype=f32, device=dev)
        self.thresholds = torch.zeros(n_sites, max_slots, dtype=f32, device=dev)
        # Per token of the current step.
        self.token_slot = torch.full((max_tokens,), -1, dtype=torch.int64, device=dev)
        self.token_cos = torch.ones(max_tokens, dtype=f32, device=dev)
        self.token_sin = torch.zeros(max_tokens, dtype=f32, device=dev)
        self.token_scale = torch.zeros(max_tokens, dtype=f32, device=dev)
        # Gates: each token's decision row, and the slot the op reads (token_slot where the row fired, else -1;
        # one scratch entry past the tokens takes the writes of padding).
        self.gates = GateTable(max_slots, hidden_size, max_requests, max_tokens, self.device)
        self.token_row = torch.full((max_tokens,), self.gates.ROW_ALWAYS, dtype=torch.int64, device=dev)
        self.token_slot_eff = torch.full((max_tokens + 1,), -1, dtype=torch.int64, device=dev)
        self._gate_sites = frozenset(i for i, site in enumerate(self.sites) if site.kind == GATE_HOOK)
        """Sites a gate may read: a captured graph evaluates gates at all of them."""
        pin = self.device.type == "cuda"
        self._staging = {
            "slot": torch.empty(max_tokens, dtype=torch.int64, pin_memory=pin),
            "cos": torch.empty(max_tokens, dtype=torch.float32, pin_memory=pin),
            "sin": torch.empty(max_tokens, dtype=torch.float32, pin_memory=pin),
            "scale": torch.empty(max_tokens, dtype=torch.float32, pin_memory=pin),
            "row": torch.empty(max_tokens, dtype=torch.int64, pin_memory=pin),
        }
        # A non-blocking copy from pinned memory reads the host buffer when the GPU gets to it, which
        # can be after the next begin_step has overwritten it (the GPU still busy with this step): the
        # step would run with the next step's map. Waiting on an event recorded after the copies
        # before refilling closes that race; it costs nothing when the copies are done, as they
        # normally are (vLLM's async scheduling waits on its own input-prep event for its buffers).
        self._staging_copied = torch.cuda.Event() if pin else None
        self._slots = [_Slot() for _ in range(max_slots)]
        self._bindings: dict[str, _Binding] = {}
        self._site_active = [False] * n_sites
        self._site_method: list[Method | None] = [None] * n_sites
        """Per site this step: the one method its steered slots share (short path), else None."""
        self._fused = choose_fused_op(fused, self.device, hidden_size)
        self.fused_fallbacks = 0
        """Captures that found the fused op not compiled for their call and captured the eager op."""
        self._filled = 0  # tokens written by the last step (the rest of token_slot is -1)
        self.steps_steered = 0  # steps in which at least one token was steered (for tests/metrics)

    # ------------------------------------------------------------ requests

    def add_request(self, req_id: str, steering: ResolvedSteering | None, eos_token_id: int | None = None) -> None:
        """Bind a new request to a slot (loading its profile into one if needed).

        ``eos_token_id``: the request's end-of-sequence token, which ends a forced refusal (action ``refuse``)."""
        self.remove_request(req_id)
        if steering is None:
            return
        refusal = None
        if steering.refusal is not None:
            if eos_token_id is None:
                raise RuntimeError(f"request {req_id}: a refusal needs the request's end-of-sequence token")
            refusal = (*self.refusal_ids(steering.refusal), eos_token_id)
        held: list[int] = []
        try:
            slot = self._acquire(steering)
            held.append(slot)
            for target in route_targets(steering):
                held.append(self._acquire(target))
            row = self.gates.acquire_row() if self._slots[slot].decide_site is not None else None
        except (SlotsExhaustedError, RowsExhaustedError):
            for i in held:
                self._slots[i].refs -= 1
            raise
        routes = tuple(held[1:])
        if routes:
            by_category = dict(zip(steering.route, routes, strict=True))
            gating = self._profile_of(steering).spec.gating
            assert gating is not None
            self.gates.set_routes(slot, [by_category[g.category] if g.category else -1 for g in gating.gates])
        cos, sin = steering.cos_sin
        self._bindings[req_id] = _Binding(slot, cos, sin, steering.scale, row=row, refusal=refusal, routes=routes)

    def refusal_ids(self, text: str) -> tuple[int, ...]:
        """A refusal text's token ids (tokenized once per text)."""
        ids = self._refusal_ids.get(text)
        if ids is None:
            if self._tokenize is None:
                raise RuntimeError("this runtime has no tokenizer: it cannot force a refusal")
            ids = tuple(int(i) for i in self._tokenize(text))
            self._refusal_ids[text] = ids
        return ids

    def force_refusals(self, logits: torch.Tensor) -> torch.Tensor:
        """The step's logits with each refusing request's row (if its gate fired) set to its next refusal token."""
        return self.gates.force_refusals(logits)

    def remove_request(self, req_id: str) -> None:
        binding = self._bindings.pop(req_id, None)
        if binding is not None:
            for slot in (binding.slot, *binding.routes):
                self._slots[slot].refs -= 1
            if binding.row is not None:
                gate_of = self._slots[binding.slot].gate_of
                self._finished[req_id] = (gate_of, binding.decided, self.gates.snapshot(binding.slot, binding.row))
                while len(self._finished) > FINISHED_DECISIONS:
                    self._finished.popitem(last=False)
                self.gates.release_row(binding.row)

    def decision(self, req_id: str) -> GateDecision | None:
        """A gated request's decision, bound or among the last finished (``None``: unknown or not gated). Reads
        the device: not for the step loop."""
        binding = self._bindings.get(req_id)
        if binding is not None and binding.row is not None:
            return self.gates.decision(binding.slot, binding.row, binding.decided)
        finished = self._finished.get(req_id)
        return None if finished is None else self.gates.read(finished[2], finished[1])

    def gate_decisions(self, match: str) -> list[dict[str, object]]:
        """The decisions of the gated requests (bound, or among the last finished) whose id contains ``match``
        (the server's request id is part of vLLM's): ``request``, ``profile``, ``action``, ``fired`` (``None``:
        undecided), ``gates`` (the deciding gates that fired), ``scores`` (every gate's); on a profile with routing
        gates, ``route_gates`` (their names), and for a routing request the ``category`` it steered with. Reads the
        device: for the workers' RPC, between steps."""
        found = [
            (req_id, self._slots[b.slot].gate_of, b.decided, self.gates.snapshot(b.slot, b.row))
            for req_id, b in self._bindings.items()
            if match in req_id and b.row is not None
        ]
        found += [(req_id, *record) for req_id, record in self._finished.items() if match in req_id]
        out: list[dict[str, object]] = []
        for req_id, (profile_id, action, digest, routes), decided, snapshot in sorted(found, key=lambda f: f[0]):
            decision = self.gates.read(snapshot, decided)
            version = self._versions.get(digest)
            gating = version.spec.gating if version is not None else None
            record: dict[str, object] = {
                "request": req_id,
                "profile": profile_id,
                "action": action,
                "fired": decision.fired,
                "gates": fired_gates(gating, decision.scores) if decided and gating is not None else [],
                "scores": decision.scores,
            }
            if gating is not None and gating.routes:  # routing gates only route: not counted as decisions
                record["route_gates"] = [g.name for g in gating.gates if g.category is not None]
            if routes and gating is not None:  # the category it was steered with (None: not decided, or not gated)
                record["category"] = route_of(gating, decision.scores) if decision.fired else None
            out.append(record)
        return out

    def add_profiles(self, profiles: Mapping[str, Profile]) -> None:
        """Hot reload: make these the current profiles; older versions stay available by digest.

        No new hook can appear without recompiling, so every site a profile steers must already
        be hooked; otherwise :class:`MissingSitesError` and nothing changes.
        """
        for profile in profiles.values():
            missing = sorted(set(sites_for_profiles({profile.id: profile})) - set(self.site_ids))
            if missing:
                shown = ", ".join(f"{s.layer}.{s.kind}" for s in missing[:6])
                raise MissingSitesError(
                    f"profile {profile.id!r} steers sites this engine has no hooks at ({shown}"
                    f"{', ...' if len(missing) > 6 else ''}); start the server with "
                    "VLLM_STEER_HOOK_ALL_SITES=1 to hot-load any profile"
                )
        self.profiles = dict(profiles)
        self._versions.update({p.digest: p for p in profiles.values()})

    def version(self, digest: str) -> Profile | None:
        """The profile version with this content digest, if this runtime ever loaded it."""
        return self._versions.get(digest)

    def is_bound(self, req_id: str) -> bool:
        return req_id in self._bindings

    @property
    def slots_in_use(self) -> int:
        return sum(1 for s in self._slots if s.refs > 0)

    def _acquire(self, steering: ResolvedSteering) -> int:
        key = steering.slot_key
        for i, slot in enumerate(self._slots):
            if slot.key == key:
                slot.refs += 1
                return i
        # Prefer a never-used slot, then any idle one (its old profile is overwritten).
        free = [i for i, s in enumerate(self._slots) if s.refs == 0]
        if not free:
            raise SlotsExhaustedError(
                f"all {self.max_slots} steering slots are in use by distinct profiles; raise max_slots"
            )
        free.sort(key=lambda i: self._slots[i].key is not None)
        i = free[0]
        self._load_slot(i, steering)
        self._slots[i].key = key
        self._slots[i].refs = 1
        return i

    def _profile_of(self, steering: ResolvedSteering) -> Profile:
        return self._versions.get(steering.profile_digest) or self.profiles[steering.profile_id]

    def _load_slot(self, slot: int, steering: ResolvedSteering) -> None:
        profile = self._profile_of(steering)
        self.bases[:, slot].zero_()
        self.methods[:, slot] = int(Method.NONE)
        self.gains[:, slot] = 0.0
        self.thresholds[:, slot] = 0.0
        gating = profile.spec.gating
        gate_sites = {layer: self.site_ids[Site(layer, GATE_HOOK)] for layer in (gating.layers if gating else ())}
        self._slots[slot].decide_site = self.gates.load_slot(slot, profile, gate_sites)
        action = steering.gate_action or ""
        self._slots[slot].gate_of = (
            (profile.id, action, profile.digest, bool(steering.route)) if gating is not None else ("", "", "", False)
        )
        active: set[int] = set()
        # Refuse and flag leave the activations alone (a gate-only profile does nothing else); a routing slot
        # only decides (its categories' slots steer).
        steers = gating is None or (steering.gate_action == "steer" and not steering.route)
        method = Method.NONE
        if steers:
            entry = profile.spec.method_spec
            method = entry.op
            for layer in steering.layers or profile.spec.layers:
                b1, b2, gain = entry.basis(profile.vectors[layer], steering.categories)
                for kind in entry.hooks:
                    site = self.site_ids.get(Site(layer, kind))
                    if site is None:
                        raise RuntimeError(
                            f"profile {profile.id!r} steers {Site(layer, kind)}, which has no hook installed"
                        )
                    self.bases[site, slot, 0].copy_(b1)
                    self.bases[site, slot, 1].copy_(b2)
                    self.methods[site, slot] = int(method)
                    self.gains[site, slot] = gain
                    self.thresholds[site, slot] = profile.spec.threshold
                    active.add(site)
        self._slots[slot].active_sites = frozenset(active)
        self._slots[slot].method = method

    # ---------------------------------------------------------------- steps

    def begin_step(
        self,
        req_ids: Sequence[str | None],
        num_tokens: Sequence[int] | np.ndarray,
        num_computed: Sequence[int] | np.ndarray | None = None,
        prompt_lens: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Build this step's token → slot map: request ``i`` owns the next ``num_tokens[i]`` rows.

        ``num_computed`` (tokens of each request computed before this step) and ``prompt_lens`` place a gated
        request's tokens relative to its last prompt token (:mod:`vllm_steer.engine.gating`); they are needed
        only when a gated request is in the step."""
        counts = np.asarray(num_tokens, dtype=np.int64)
        n = int(counts.sum())
        if n > self.max_tokens:
            raise RuntimeError(f"step has {n} tokens, buffers hold {self.max_tokens}")
        slots = np.full(len(counts), -1, dtype=np.int64)
        cos = np.ones(len(counts), dtype=np.float32)
        sin = np.zeros(len(counts), dtype=np.float32)
        scale = np.zeros(len(counts), dtype=np.float32)
        active: set[int] = set()
        used: set[int] = set()
        gated: list[tuple[int, _Binding]] = []
        for i, req_id in enumerate(req_ids):
            binding = self._bindings.get(req_id) if req_id is not None else None
            if binding is not None and counts[i] > 0:
                slots[i], cos[i], sin[i], scale[i] = binding.slot, binding.cos, binding.sin, binding.scale
                if binding.row is not None:
                    gated.append((i, binding))
                for slot in (binding.slot, *binding.routes):  # a routing request may steer with any of its routes
                    if slot not in used:
                        used.add(slot)
                        active |= self._slots[slot].active_sites
        self._site_active = [i in active for i in range(len(self.sites))]
        self._site_method = self._shared_methods(used)
        if active:
            self.steps_steered += 1
        token_slots = np.repeat(slots, counts)
        token_rows = np.full(n, self.gates.ROW_ALWAYS, dtype=np.int64)
        deciding: list[DecidingToken] = []
        forced: list[ForcedToken] = []
        if gated:
            if num_computed is None or prompt_lens is None:
                raise RuntimeError("a gated request is in the step: begin_step needs num_computed and prompt_lens")
            offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
            for i, binding in gated:
                assert binding.row is not None
                off, count, start, prompt_len = (
                    int(offsets[i]),
                    int(counts[i]),
                    int(num_computed[i]),
                    int(prompt_lens[i]),
                )
                if start >= prompt_len:  # only generated tokens (every decode step): the request's slot and row
                    token_rows[off : off + count] = binding.row
                else:
                    site = self._slots[binding.slot].decide_site
                    assert site is not None
                    token_slots[off : off + count], token_rows[off : off + count], token = self.gates.request_tokens(
                        off, start, count, prompt_len, binding.slot, binding.row, binding.decided, site
                    )
                    if token is not None:
                        deciding.append(token)
                        binding.decided = True  # decided in this step's forward pass, on the device
                if binding.refusal is not None:
                    generated = start + count - prompt_len  # index of the token sampled now
                    if generated >= 0:  # the step samples for this request (not a prompt chunk before the last)
                        token_id = binding.refusal[min(generated, len(binding.refusal) - 1)]  # then the EOS again
                        forced.append(ForcedToken(index=i, row=binding.row, token=token_id))
        stage = self._staging
        if self._staging_copied is not None:
            self._staging_copied.synchronize()  # the last step's copies have read the staging buffers
        stage["slot"][:n] = torch.from_numpy(token_slots)
        stage["cos"][:n] = torch.from_numpy(np.repeat(cos, counts))
        stage["sin"][:n] = torch.from_numpy(np.repeat(sin, counts))
        stage["scale"][:n] = torch.from_numpy(np.repeat(scale, counts))
        stage["row"][:n] = torch.from_numpy(token_rows)
        non_blocking = self.device.type == "cuda"
        self.token_slot[:n].copy_(stage["slot"][:n], non_blocking=non_blocking)
        self.token_cos[:n].copy_(stage["cos"][:n], non_blocking=non_blocking)
        self.token_sin[:n].copy_(stage["sin"][:n], non_blocking=non_blocking)
        self.token_scale[:n].copy_(stage["scale"][:n], non_blocking=non_blocking)
        self.token_row[:n].copy_(stage["row"][:n], non_blocking=non_blocking)
        self.gates.begin(deciding, forced)
        if self._staging_copied is not None:
            self._staging_copied.record()
        if self._filled > n:
            self.token_slot[n : self._filled].fill_(-1)
            self.token_row[n : self._filled].fill_(self.gates.ROW_ALWAYS)
        self._filled = n
        # Every token's effective slot, on the device: a gated request's rows read its decision (no host read).
        self.gates.effective_slots(self.token_slot, self.token_row, self.token_slot_eff[: self.max_tokens])

    def _shared_methods(self, used: set[int]) -> list[Method | None]:
        """Per site: the method every slot steering it this step shares, else None (two methods meet there)."""
        by_method: dict[Method, set[int]] = {}
        for slot in used:
            by_method.setdefault(self._slots[slot].method, set()).update(self._slots[slot].active_sites)
        shared: list[Method | None] = [None] * len(self.sites)
        for method, sites in by_method.items():
            others = set().union(*(s for m, s in by_method.items() if m != method))
            for site in sites - others:
                shared[site] = method
        return shared

    def delta(self, h: torch.Tensor, site: int) -> torch.Tensor:
        """The ``[N, d]`` steering correction at one site for the current step (zeros for unsteered rows).

        At a gate's site it also scores the step's deciding tokens first (on ``h``, before this site's own
        steering), and afterwards makes the decisions final for tokens whose deepest gate this is."""
        capturing = _capturing_cuda_graph(h)
        gate_count = 0
        if site in self._gate_sites and (capturing or site in self.gates.step_sites):
            gate_count = self.gates.max_requests if capturing else self.gates.count  # a graph serves any step
            self.gates.evaluate(h, site, gate_count)
        out = self._steering_delta(h, site, capturing)
        if gate_count:
            self.gates.complete(site, gate_count, self.token_slot_eff)
        return out

    def _steering_delta(self, h: torch.Tensor, site: int, capturing: bool) -> torch.Tensor:
        n = h.shape[0]
        args = (
            h,
            self.bases[site],
            self.methods[site],
            self.gains[site],
            self.thresholds[site],
            self.token_slot_eff[:n],
            self.token_cos[:n],
            self.token_sin[:n],
            self.token_scale[:n],
        )
        fused = self._fused
        if capturing:  # a captured graph must serve any mix: the general op, fused if compiled
            out = fused.in_capture(args) if fused is not None else token_deltas(*args)
            if out is None:
                assert fused is not None  # only the fused op can lack a compiled variant
                if not self.fused_fallbacks:
                    logger.warning(
                        "vllm-steer: the %s steering op was not compiled for this call (%s); the CUDA "
                        "graph captures the eager op instead",
                        fused.name,
                        fused.kind(h),
                    )
                self.fused_fallbacks += 1
                out = token_deltas(*args)
            return out
        # Host decisions per step.
        if not self._site_active[site]:
            if fused is not None and h.is_cuda and not fused.seen(h):
                # vLLM's warm-up runs before it captures each batch size steer nothing: run the fused op
                # anyway once per kind of call, so the capture finds it compiled (no captures on CPU).
                fused.run(args)
            return torch.zeros_like(h)  # nothing steered here this step
        method = self._site_method[site]
        if fused is not None and (method is None or fused.name == "triton"):
            return fused.run(args)  # one Triton launch beats even a short path; Inductor's fusion does not
        if method is not None:
            return single_method_deltas(method, h, args[1], *args[3:])
        return token_deltas(*args)

    @property
    def fused(self) -> str | None:
        """The fused general op in use (``triton``, ``compiled``), or None (eager op and short paths)."""
        return self._fused.name if self._fused is not None else None

    @property
    def fused_kinds(self) -> frozenset[tuple[object, ...]]:
        """The kinds of call the fused op has been compiled for, outside any capture."""
        return self._fused.kinds if self._fused is not None else frozenset()


class SlotGate:
    """The scheduler's twin of the worker's slot table, so a step never needs more slots than exist.

    vLLM's scheduler does the same for LoRA (``max_loras``): a waiting request whose adapter would
    exceed the limit is skipped this step and stays first in line. Here a request holds its slots from
    the step that first schedules it until the step that reports it finished (preempted requests keep
    theirs, as in :class:`SteeringRuntime`), so the gate mirrors exactly what the worker sees in the
    scheduler outputs: ``scheduled_new_reqs`` bind, ``finished_req_ids`` free. Without it, more
    distinct settings in flight than slots raised :class:`SlotsExhaustedError` in the worker and
    stopped the engine for every tenant. A request holds one slot per key
    (:func:`~vllm_steer.core.request.admission_keys`: a routing request holds one per category too).
    """

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError("the slot budget must be at least 1")
        self.budget = budget
        self._bound: dict[str, tuple[tuple[object, ...], ...]] = {}
        self._step: set[tuple[object, ...]] | None = None
        self.deferred = 0
        """Times a request waited a step for a slot (for tests and metrics)."""

    def begin_step(self, finishing: Iterable[str]) -> None:
        """Before a scheduling pass: slots in use, less those the worker frees first this step."""
        finishing = set(finishing)
        self._step = {key for req_id, keys in self._bound.items() if req_id not in finishing for key in keys}

    def admit(self, req_id: str, keys: Sequence[tuple[object, ...]]) -> bool:
        """May this waiting request be scheduled now? Reserves its slots for the pass if so."""
        if self._step is None or req_id in self._bound:
            return True
        needed = set(keys) - self._step
        if not needed:
            return True
        if len(self._step) + len(needed) > self.budget:
            self.deferred += 1
            return False
        self._step |= needed
        return True

    def end_step(self, new: Iterable[tuple[str, Sequence[tuple[object, ...]]]], finished: Iterable[str]) -> None:
        """After the pass: what the worker will bind and free from this step's output."""
        self._step = None
        for req_id in finished:
            self._bound.pop(req_id, None)
        for req_id, keys in new:
            if keys:
                self._bound[req_id] = tuple(keys)

    @property
    def in_use(self) -> int:
        return len({key for keys in self._bound.values() for key in keys})


def _capturing_cuda_graph(h: torch.Tensor) -> bool:
    return h.is_cuda and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------- the custom op

_RUNTIME: SteeringRuntime | None = None


def set_runtime(runtime: SteeringRuntime | None) -> None:
    global _RUNTIME
    _RUNTIME = runtime


def get_runtime() -> SteeringRuntime | None:
    return _RUNTIME


_lib = torch.library.Library("vllm_steer", "FRAGMENT")
_lib.define("delta(Tensor h, int site) -> Tensor")


def _delta_impl(h: torch.Tensor, site: int) -> torch.Tensor:
    runtime = _RUNTIME
    if runtime is None:
        return torch.zeros_like(h)
    return runtime.delta(h, site)


def _delta_fake(h: torch.Tensor, site: int) -> torch.Tensor:
    return torch.empty_like(h)


_lib.impl("delta", _delta_impl, "CompositeExplicitAutograd")
torch.library.register_fake("vllm_steer::delta", _delta_fake, lib=_lib)
