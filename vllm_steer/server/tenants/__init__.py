"""Multi-tenant steering policy: which API key may steer with what.

Why this exists: ``steer_*`` keys come from clients (``vllm_xargs``). Left to
the engine alone, any client may pick any loaded profile at any strength, or
none at all, which undoes a safety profile (angle 0, scale 0, ``"none"``, or
just leaving the keys out). A *tenants file* maps each API key to a tenant and
a *tier*. The OpenAI front end calls :meth:`TenantPolicy.decide` before a
request reaches the engine and forwards only the *effective* steering the tier
permits. Parsing and validation are :mod:`vllm_steer.core.request`'s (one set of
limits, one verdict offline and served), and the engine re-validates every request:
defense in depth, so a bug here can at worst weaken a tier, never get an
invalid setting steered.

Tiers (``format_version: 1``, :mod:`~vllm_steer.server.tenants.schema`):

* ``forced`` -- one setting applied to every request; the client may restate it
  exactly, and anything else (another profile, ``"none"``, another angle or
  scale, categories, layers) is refused. It is never silently replaced.
* ``default`` -- applied when a request names no profile.
* ``profiles`` -- ``"*"`` (every loaded profile, its full ranges) or a mapping
  ``id -> {angle: [lo, hi], scale: [lo, hi], categories: [...]}``.
* gated profiles (:mod:`vllm_steer.core.gates`): ``forced``/``default`` may set the gate's ``gate_action``
  and ``refusal`` text (a forced tier's clients may restate them, never change them); a grant's
  ``gate_actions`` lists the other actions a client may ask for (``steer_gate_action``); only a tier approving
  every profile lets clients set ``steer_refusal``. Thresholds are the profile's. A routing request
  (``steer_categories: "auto"``, gates that route to categories) passes through as ``auto``; a grant with
  ``categories`` admits it only if it lists every category the gates route to; ``forced``/``default`` may set
  ``categories: [auto]`` on a profile whose gates route.
* ``allow_unsteered`` -- may a client send ``steer_profile: "none"``?
* ``allow_layers_override`` -- may a client send ``steer_layers``?
* ``max_concurrent_steered`` -- steered sequences in flight per tenant (a request counts ``n`` times its
  prompts, :func:`~vllm_steer.server.tenants.controls.rows`; one that alone exceeds it is refused with 403).
* ``allow_controls`` -- which request fields outside ``vllm_xargs`` that can counteract the steering
  (assistant prefill, raw completions, ``logit_bias``, grammars, ``n``, LoRA, ...: the closed table
  :data:`~vllm_steer.server.tenants.controls.CONTROLS`) its clients may use; ``"*"`` for all. Default:
  all when ``allow_unsteered``, none otherwise. :meth:`TenantPolicy.check_controls` refuses the others (403).

Status codes, as :class:`PolicyError`: 400 when the request is malformed or
invalid for the profile whoever sends it, 401 when the key is missing or unknown,
403 when it is valid but above the caller's tier, 429 over the tier's
concurrency limit, 500 when the tier's own setting cannot be applied.

API keys are random tokens (:func:`generate_api_key`), so the file holds only a
fast salted hash (:mod:`~vllm_steer.server.tenants.keys`;
``python -m vllm_steer.server.tenants new-key`` / ``hash-key``).

Modules: ``errors``, ``keys``, ``controls`` (request fields that counteract steering), ``schema``,
``loading`` (the file), ``steering`` (a request's keys under a tier), ``policy`` (:class:`TenantPolicy`),
``discovery`` (the profiles route's view), ``cli``.
"""

from __future__ import annotations

from vllm_steer.core.request import STEER_KEYS as KNOWN_STEER_KEYS
from vllm_steer.server.tenants.controls import ALL_CONTROLS, CONTROL_NAMES, CONTROLS, Control, rows, used_controls
from vllm_steer.server.tenants.errors import PolicyError, TenantsFileError
from vllm_steer.server.tenants.keys import bearer_token, generate_api_key, hash_api_key
from vllm_steer.server.tenants.loading import load_tenants_file
from vllm_steer.server.tenants.policy import SteeringSlot, Tenant, TenantPolicy
from vllm_steer.server.tenants.schema import (
    ALL_PROFILES,
    AdminEntry,
    ProfileGrant,
    Setting,
    TenantEntry,
    TenantsFile,
    Tier,
)
from vllm_steer.server.tenants.steering import UNSTEERED

__all__ = [
    "ALL_CONTROLS",
    "ALL_PROFILES",
    "CONTROLS",
    "CONTROL_NAMES",
    "Control",
    "rows",
    "used_controls",
    "KNOWN_STEER_KEYS",
    "UNSTEERED",
    "PolicyError",
    "TenantsFileError",
    "ProfileGrant",
    "Setting",
    "Tier",
    "TenantEntry",
    "TenantsFile",
    "AdminEntry",
    "Tenant",
    "SteeringSlot",
    "TenantPolicy",
    "hash_api_key",
    "generate_api_key",
    "bearer_token",
    "load_tenants_file",
]
