"""The product's facts, with no engine or server in them: the steering math, the method table, the profile
format, per-request settings, the plugin's settings, the model layout and fingerprint, and the keys the server
and the engine exchange.

Everything above (``engine``, ``server``, ``calibration``, ``evaluation``) reads these; nothing here imports
anything of ours from above.
"""

from __future__ import annotations

from vllm_steer.core.errors import SteerError, field_and_message
from vllm_steer.core.extras import MissingExtraError, require
from vllm_steer.core.fingerprint import fingerprint_from_config, fingerprint_from_dir
from vllm_steer.core.layout import HOOK_KINDS, DecoderLayout, decoder_layers, layout_for
from vllm_steer.core.methods import ANGLE_METHODS, METHOD_HOOKS, METHODS, SCALE_METHODS, MethodSpec
from vllm_steer.core.ops import Method
from vllm_steer.core.profile import (
    ModelFingerprint,
    Profile,
    ProfileError,
    ProfileSpec,
    load_profile,
    load_profile_dir,
    profile_changes,
    save_profile,
)
from vllm_steer.core.request import (
    STEER_KEYS,
    ResolvedSteering,
    SteeringRequest,
    SteeringRequestError,
    parse_steering,
    resolve_steering,
)
from vllm_steer.core.settings import ConfigError, SteerConfig

__all__ = [
    "SteerError",
    "field_and_message",
    "MissingExtraError",
    "require",
    "decoder_layers",
    "HOOK_KINDS",
    "DecoderLayout",
    "layout_for",
    "fingerprint_from_config",
    "fingerprint_from_dir",
    "Method",
    "METHODS",
    "MethodSpec",
    "ANGLE_METHODS",
    "SCALE_METHODS",
    "METHOD_HOOKS",
    "ModelFingerprint",
    "Profile",
    "ProfileSpec",
    "ProfileError",
    "load_profile",
    "load_profile_dir",
    "save_profile",
    "profile_changes",
    "STEER_KEYS",
    "SteeringRequest",
    "SteeringRequestError",
    "ResolvedSteering",
    "parse_steering",
    "resolve_steering",
    "SteerConfig",
    "ConfigError",
]
