"""Per-row gates inside the batched forward pass: the decision buffers, and what each step does with them.

A gated request (its profile has a ``gating`` block, :mod:`vllm_steer.core.gates`) is decided on its **last
prompt token**, which every step that finishes a prompt computes whatever the prefix cache and chunked
prefill skip. The decision is a value in a static per-request buffer (a *row*), written on the device
inside the forward pass and never read by the host while the engine runs, so nothing synchronises:

* ``begin`` (host, per step) lists the step's *deciding tokens* (a gated request's last prompt token) in
  static index buffers, and maps every token to a row: its request's row for tokens after the prompt,
  :data:`ROW_ALWAYS` for ungated requests (always on), :data:`ROW_NEVER` for the deciding token until its
  decision is final. The token's effective slot is ``slot if fired[row] else -1``, computed on the device.
* At a gate's site (the output of its layer) the deciding tokens' rows are scored and the fired bit is
  OR-ed into the row (:meth:`GateTable.evaluate`).
* At the deepest gate of its profile the deciding token's own effective slot is set from its row
  (:meth:`GateTable.complete`): it is steered, if gated, at the sites of later layers.

For action ``refuse`` the request's row of the logits is replaced, from its first generated token on and only if
its row fired, by a one-hot row of the next token of its refusal (:meth:`GateTable.force_refusals`, called by the
engine's logits processor); the host knows which token is next, the device whether the row fired.

Only a slot's *deciding* gates (:attr:`GateTable.decides`: those without a category) fire the row. A *routing*
request (``steer_categories: "auto"`` on a category profile with routing gates) steers, if its row fired, with the
slot of the category whose routing gate has the largest margin, fired or not (:func:`~vllm_steer.core.gates.route_of`):
each routing gate of its slot names a target slot (:attr:`GateTable.routes`), the row keeps the best margin so far
and its slot (:attr:`GateTable.route`), and the effective slot reads that slot instead of the request's own (which
steers nothing).

So for action ``steer``: prompt tokens before the last are never steered; the last prompt token is steered at
the sites of layers after the deepest gate, if gated; every generated token is steered at every site, if
gated. That is independent of how the prompt was chunked or cached. A request decides once: a recompute of
its last prompt token (after preemption) reads the stored decision and writes nothing.

Pure torch and numpy, no vLLM import; :class:`~vllm_steer.engine.runtime.SteeringRuntime` owns one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_steer.core.gates import MAX_GATES, SCORE_CODES, batched_scores
from vllm_steer.core.profile import Profile

__all__ = ["GateTable", "GateDecision", "RowsExhaustedError", "DecidingToken", "ForcedToken"]


class RowsExhaustedError(RuntimeError):
    """More gated requests in flight than decision rows (sized from ``max_num_seqs``)."""


@dataclass(frozen=True)
class GateDecision:
    """A gated request's decision, as the device holds it: ``fired`` is ``None`` until its last prompt token
    has passed every gate; ``scores`` maps gate name to its score (``nan``: not evaluated yet)."""

    fired: bool | None
    scores: dict[str, float]


@dataclass(frozen=True)
class DecidingToken:
    """One deciding token of a step (host side): where it is in the step, its slot and its row."""

    position: int
    slot: int
    row: int
    write: bool
    """First decision of the request (``False``: a recompute after preemption; the stored decision holds)."""
    site: int
    """The deepest gate's site: where the decision becomes final and the token's own steering starts."""


@dataclass(frozen=True)
class ForcedToken:
    """A refusing request's logits row this step (host side): the token it gets if its row fired."""

    index: int
    """The request's row of the step's logits (its place in the batch)."""
    row: int
    token: int


class GateTable:
    """The gate tables of every slot, the per-request decision rows, and the step's deciding tokens.

    Rows ``[0, n_rows)`` belong to requests; :data:`ROW_ALWAYS` is fixed at 1 (ungated tokens),
    :data:`ROW_NEVER` at 0 (a deciding token before its decision), :data:`ROW_SINK` takes the writes of
    padding entries.
    """

    def __init__(self, max_slots: int, hidden_size: int, max_requests: int, max_tokens: int, device: torch.device):
        self.max_requests = max_requests
        self.n_rows = 4 * max_requests  # running + preempted requests hold rows; preempted ones are few
        self.ROW_ALWAYS = self.n_rows
        self.ROW_NEVER = self.n_rows + 1
        self.ROW_SINK = self.n_rows + 2
        self.scratch_position = max_tokens  # the effective slot map has one scratch entry past the tokens
        f32, i64, dev = torch.float32, torch.int64, device
        g = MAX_GATES
        # Per slot: up to MAX_GATES gates (direction, site, threshold, comparison sign, score code).
        self.directions = torch.zeros(max_slots, g, hidden_size, dtype=f32, device=dev)
        self.sites = torch.full((max_slots, g), -1, dtype=i64, device=dev)
        self.thresholds = torch.zeros(max_slots, g, dtype=f32, device=dev)
        self.signs = torch.zeros(max_slots, g, dtype=f32, device=dev)  # +1 '>', -1 '<', 0 no gate
        self.codes = torch.zeros(max_slots, g, dtype=i64, device=dev)
        self.decides = torch.zeros(max_slots, g, dtype=torch.bool, device=dev)
        """The slot's deciding gates (no category): only they fire a row."""
        self.routes = torch.full((max_slots, g), -1, dtype=i64, device=dev)
        """A routing slot's gates: the slot holding each routing gate's category's steering (-1: no routing gate, or
        a request that names its categories)."""
        # Per row: fired (0/1) and every gate's score.
        self.fired = torch.zeros(self.n_rows + 3, dtype=f32, device=dev)
        self.fired[self.ROW_ALWAYS] = 1.0
        self.scores = torch.full((self.n_rows + 3, g), math.nan, dtype=f32, device=dev)
        # Per row of a routing request: the slot it steers with (-1: its own) and the margin that chose it.
        self.route = torch.full((self.n_rows + 3,), -1, dtype=i64, device=dev)
        self.route_margin = torch.full((self.n_rows + 3,), -math.inf, dtype=f32, device=dev)
        # The step's deciding tokens, padded to max_requests (static shapes: a captured graph reads all).
        m = max_requests
        self.dec_position = torch.zeros(m, dtype=i64, device=dev)  # where to read h (padding: token 0)
        self.dec_target = torch.full((m,), max_tokens, dtype=i64, device=dev)  # where to write the slot
        self.dec_slot = torch.zeros(m, dtype=i64, device=dev)
        self.dec_write_row = torch.full((m,), self.ROW_SINK, dtype=i64, device=dev)
        self.dec_read_row = torch.full((m,), self.ROW_NEVER, dtype=i64, device=dev)
        self.dec_site = torch.full((m,), -1, dtype=i64, device=dev)
        # The step's refusing requests: their logits row, decision row and next refusal token.
        self.refuse_index = torch.zeros(m, dtype=i64, device=dev)
        self.refuse_row = torch.full((m,), self.ROW_NEVER, dtype=i64, device=dev)
        self.refuse_token = torch.zeros(m, dtype=i64, device=dev)
        pin = device.type == "cuda"
        self._staging = torch.empty(9, m, dtype=i64, pin_memory=pin)
        self.refusing = 0
        """Refusing requests in this step's logits (host)."""
        self._padded = True
        """The step buffers hold only padding (as allocated above, or as the last empty step staged them)."""
        self._free_rows = list(range(self.n_rows - 1, -1, -1))
        self._slot_gate_names: list[tuple[str, ...]] = [() for _ in range(max_slots)]
        self._slot_gate_sites: list[frozenset[int]] = [frozenset() for _ in range(max_slots)]
        self.count = 0
        """Deciding tokens this step (host)."""
        self.step_sites: frozenset[int] = frozenset()
        """Sites where some deciding token of this step has a gate (host)."""

    # ------------------------------------------------------------- slots and rows

    def load_slot(self, slot: int, profile: Profile | None, site_of_layer: dict[int, int]) -> int | None:
        """Write ``profile``'s gates into ``slot`` (clears it for an ungated profile); returns the site where a
        decision becomes final (the deepest gate's), ``None`` without gates."""
        self.directions[slot].zero_()
        self.sites[slot] = -1
        self.thresholds[slot] = 0.0
        self.signs[slot] = 0.0
        self.codes[slot] = 0
        self.decides[slot] = False
        self.routes[slot] = -1
        self._slot_gate_names[slot] = ()
        self._slot_gate_sites[slot] = frozenset()
        gating = profile.spec.gating if profile is not None else None
        if profile is None or gating is None:
            return None
        for j, gate in enumerate(gating.gates):
            self.directions[slot, j].copy_(profile.gate_vectors[gate.name])
            self.sites[slot, j] = site_of_layer[gate.layer]
            self.thresholds[slot, j] = gate.threshold
            self.signs[slot, j] = 1.0 if gate.comparison == ">" else -1.0
            self.codes[slot, j] = SCORE_CODES[gate.score]
            self.decides[slot, j] = gate.category is None
        self._slot_gate_names[slot] = tuple(g.name for g in gating.gates)
        self._slot_gate_sites[slot] = frozenset(site_of_layer[g.layer] for g in gating.gates)
        return site_of_layer[gating.decided_after]

    def set_routes(self, slot: int, targets: Sequence[int]) -> None:
        """A routing slot's gates: gate ``j`` (in the profile's order) routes to slot ``targets[j]`` (-1: a deciding
        gate)."""
        self.routes[slot] = -1
        self.routes[slot, : len(targets)] = torch.tensor(list(targets), dtype=torch.int64)

    def acquire_row(self) -> int:
        if not self._free_rows:
            raise RowsExhaustedError(
                f"all {self.n_rows} gate decision rows are held by requests in flight; raise max_num_seqs"
            )
        row = self._free_rows.pop()
        self.fired[row] = 0.0
        self.scores[row] = math.nan
        self.route[row] = -1
        self.route_margin[row] = -math.inf
        return row

    def release_row(self, row: int) -> None:
        self._free_rows.append(row)

    @property
    def rows_in_use(self) -> int:
        return self.n_rows - len(self._free_rows)

    def decision(self, slot: int, row: int, decided: bool) -> GateDecision:
        """Read one request's decision back (synchronises with the device: for tests, metrics, audit)."""
        return self.read(self.snapshot(slot, row), decided)

    def snapshot(self, slot: int, row: int) -> tuple[tuple[str, ...], torch.Tensor]:
        """A copy of a row (fired, then the scores) made on the device, to read later: no host read now."""
        return self._slot_gate_names[slot], torch.cat([self.fired[row : row + 1], self.scores[row]]).clone()

    @staticmethod
    def read(snapshot: tuple[tuple[str, ...], torch.Tensor], decided: bool) -> GateDecision:
        names, values = snapshot
        host = values.tolist()
        fired = bool(host[0] > 0) if decided else None
        return GateDecision(fired=fired, scores=dict(zip(names, host[1 : 1 + len(names)], strict=True)))

    # -------------------------------------------------------------------- steps

    def begin(self, deciding: Sequence[DecidingToken], forced: Sequence[ForcedToken] = ()) -> None:
        """Stage this step's deciding tokens and refusing requests (host); padding entries read token 0 and
        write nowhere."""
        if max(len(deciding), len(forced)) > self.max_requests:
            raise RuntimeError(f"{len(deciding)} deciding tokens in a step, buffers hold {self.max_requests}")
        self.count = len(deciding)
        self.refusing = len(forced)
        self.step_sites = frozenset().union(*(self._slot_gate_sites[d.slot] for d in deciding))
        if self._padded and not deciding and not forced:
            return  # the buffers hold padding already: nothing to copy (every step of a server without gates)
        self._padded = not deciding and not forced
        stage = self._staging.numpy()
        stage[0].fill(0)
        stage[1].fill(self.scratch_position)
        stage[2].fill(0)
        stage[3].fill(self.ROW_SINK)
        stage[4].fill(self.ROW_NEVER)
        stage[5].fill(-1)
        stage[6].fill(0)
        stage[7].fill(self.ROW_NEVER)
        stage[8].fill(0)
        for i, d in enumerate(deciding):
            stage[:6, i] = (d.position, d.position, d.slot, d.row if d.write else self.ROW_SINK, d.row, d.site)
        for i, f in enumerate(forced):
            stage[6:, i] = (f.index, f.row, f.token)
        non_blocking = self.fired.device.type == "cuda"
        buffers = [self.dec_position, self.dec_target, self.dec_slot, self.dec_write_row, self.dec_read_row]
        buffers += [self.dec_site, self.refuse_index, self.refuse_row, self.refuse_token]
        for buffer, values in zip(buffers, self._staging, strict=True):
            buffer.copy_(values, non_blocking=non_blocking)

    def effective_slots(self, token_slot: torch.Tensor, token_row: torch.Tensor, out: torch.Tensor) -> None:
        """``out = token_slot`` where the token's row has fired (its routed slot, for a routing request), else
        ``-1`` (device; no host read)."""
        fired = self.fired.index_select(0, token_row) > 0
        route = self.route.index_select(0, token_row)
        chosen = torch.where(route >= 0, route, token_slot)
        torch.where(fired, chosen, torch.full_like(token_slot, -1), out=out)

    def evaluate(self, h: torch.Tensor, site: int, k: int) -> None:
        """Score the first ``k`` deciding tokens' gates that read ``site``, OR their deciding gates' result into
        their rows, and keep their routing gates' best margin."""
        position = self.dec_position[:k]
        slot = self.dec_slot[:k]
        rows = self.dec_write_row[:k]
        hk = h.index_select(0, position)
        scores = batched_scores(hk, self.directions.index_select(0, slot), self.codes.index_select(0, slot))
        here = self.sites.index_select(0, slot) == site  # [k, G]
        margin = self.signs.index_select(0, slot) * (scores - self.thresholds.index_select(0, slot))
        fires = ((margin > 0) & here & self.decides.index_select(0, slot)).any(-1)
        self.fired.index_put_((rows,), torch.maximum(self.fired.index_select(0, rows), fires.float()))
        self.scores.index_put_((rows,), torch.where(here, scores, self.scores.index_select(0, rows)))
        # Routing: the routing gate with the largest margin so far (over every site; fired or not) names the slot.
        targets = self.routes.index_select(0, slot)
        best, which = torch.where(here & (targets >= 0), margin, -math.inf).max(-1)
        target = targets.gather(1, which[:, None])[:, 0]
        better = best > self.route_margin.index_select(0, rows)
        self.route.index_put_((rows,), torch.where(better, target, self.route.index_select(0, rows)))
        self.route_margin.index_put_((rows,), torch.where(better, best, self.route_margin.index_select(0, rows)))

    def complete(self, site: int, k: int, token_slot_eff: torch.Tensor) -> None:
        """For deciding tokens whose last gate is ``site``: from here on, their slot if their row fired."""
        done = self.dec_site[:k] == site
        target = torch.where(done, self.dec_target[:k], self.scratch_position)
        read = self.dec_read_row[:k]
        fired = self.fired.index_select(0, read) > 0
        route = self.route.index_select(0, read)
        value = torch.where(fired, torch.where(route >= 0, route, self.dec_slot[:k]), -1)
        token_slot_eff.index_put_((target,), value)

    def force_refusals(self, logits: torch.Tensor) -> torch.Tensor:
        """Replace the logits rows of this step's refusing requests whose row fired by a one-hot row of their next
        refusal token (every other token ``-inf``); every other row is left as it is. In place; no host read."""
        k = self.refusing
        if k == 0:
            return logits
        index = self.refuse_index[:k]
        current = logits.index_select(0, index)
        forced = torch.full_like(current, -math.inf)
        forced.scatter_(1, self.refuse_token[:k, None], 0.0)
        fired = self.fired.index_select(0, self.refuse_row[:k]) > 0
        logits.index_copy_(0, index, torch.where(fired[:, None], forced, current))
        return logits

    def request_tokens(
        self, offset: int, start: int, count: int, prompt_len: int, slot: int, row: int, decided: bool, site: int
    ) -> tuple[np.ndarray, np.ndarray, DecidingToken | None]:
        """One gated request's tokens in a step: their slots and rows, and its deciding token if it is there.

        ``offset``: the request's first token in the step's flat token array; ``start``: its first position;
        ``count``: tokens scheduled. Prompt tokens before the last get slot ``-1``; the last prompt token its
        slot and :attr:`ROW_NEVER` (until :meth:`complete`); generated tokens its slot and row.
        """
        positions = np.arange(start, start + count)
        last = prompt_len - 1
        slots = np.where(positions >= last, slot, -1).astype(np.int64)
        rows = np.where(positions == last, self.ROW_NEVER, row).astype(np.int64)
        deciding = None
        if start <= last < start + count:
            deciding = DecidingToken(position=offset + last - start, slot=slot, row=row, write=not decided, site=site)
        return slots, rows, deciding
