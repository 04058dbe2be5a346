"""Request fields, outside ``vllm_xargs``, that can counteract a tier's steering: the *controls* a tier governs.

A tier's ``forced`` (or ``default``) steering decides *how* the model is steered, but vLLM's request
fields decide *what* it generates from: an assistant prefill ("Sure, here is"), a raw
``/v1/completions`` prompt with no chat template, ``logit_bias`` against refusal tokens, a grammar
that cannot spell a refusal, many samples to keep the one that looks unsteered, a LoRA adapter, ...
Each such lever is one :class:`Control` in the closed table :data:`CONTROLS`; a tier lists the ones
its clients may use (``allow_controls`` in :class:`~vllm_steer.server.tenants.schema.Tier`) and
:meth:`~vllm_steer.server.tenants.TenantPolicy.check_controls` refuses the others with 403.

Detection reads a value the way vLLM's request models (pydantic, lax mode) will: ``"true"``, ``1`` and
``"1"`` are true, ``n: "2"`` is 2. A field sent with its default or ``null`` (``logit_bias: {}``,
``n: 1``, ``bad_words: []``) is not a use, so clients that send defaults keep working; a value of a
type vLLM would not accept counts as a use (vLLM would refuse it anyway, and the policy never guesses
in the client's favour). :func:`rows` is how many sequences a request asks the engine for, which
counts against the tier's ``max_concurrent_steered``.

Field names follow vLLM 0.32's ``ChatCompletionRequest`` and ``CompletionRequest``
(``vllm/entrypoints/openai/{chat_completion,completion}/protocol.py``); the legacy guided-decoding
fields and ``best_of``, which 0.32 ignores, are still governed in case a client's vLLM honours them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pydantic import TypeAdapter, ValidationError

__all__ = [
    "ALL_CONTROLS",
    "CHAT_PATH",
    "COMPLETIONS_PATH",
    "CONTROLS",
    "CONTROL_NAMES",
    "PRIORITY_HEADER",
    "Control",
    "MAX_ROWS",
    "rows",
    "used_controls",
]

ALL_CONTROLS = "*"
"""``allow_controls: "*"``: every control in :data:`CONTROLS`."""
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
PRIORITY_HEADER = "x-vllm-priority"
"""vLLM reads a request's priority from this header before the body's ``priority``."""
MAX_ROWS = 1 << 16
""":func:`rows` never exceeds this (far above any tier's ``max_concurrent_steered``)."""

_INT: TypeAdapter[int] = TypeAdapter(int)
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)
_UNPARSEABLE = object()
_EMBEDS_PARTS = frozenset({"prompt_embeds", "image_embeds", "audio_embeds", "video_embeds"})
_GUIDED_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structural_tag",
)


@dataclass(frozen=True)
class _Request:
    body: Mapping[str, Any]
    chat: bool
    completions: bool
    base_models: Collection[str]
    headers: Mapping[str, str] | None


@dataclass(frozen=True)
class Control:
    """One lever a tier governs: its ``name`` (as written in ``allow_controls``), the request ``fields`` it
    covers, a one-line ``description`` (docs and refusals) and a ``detector`` yielding the fields a request
    uses it through, in the order of ``fields``."""

    name: str
    fields: tuple[str, ...]
    description: str
    detector: Callable[[_Request], Iterator[str]] = field(repr=False, compare=False)


# --------------------------------------------------------------------------- reading values as vLLM will


def _lax(adapter: TypeAdapter[Any], value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except (ValidationError, TypeError, ValueError):
        return _UNPARSEABLE


def _sent(value: Any) -> bool:
    """Whether a value is more than ``null`` or an empty list/mapping (what vLLM treats as "not set")."""
    if value is None:
        return False
    return not (isinstance(value, (list, tuple, dict)) and len(value) == 0)


def _true_or_odd(value: Any) -> bool:
    """A boolean field set: vLLM reads it as true, or could not read it at all (``null``: its default)."""
    return value is not None and _lax(_BOOL, value) is not False


def _false_or_odd(value: Any) -> bool:
    return value is not None and _lax(_BOOL, value) is not True


def _int_other_than(value: Any, *, default: int, used: Callable[[int], bool]) -> bool:
    if value is None:
        return False
    parsed = _lax(_INT, value)
    return parsed is _UNPARSEABLE or (parsed != default and used(parsed))


def _present(request: _Request, *names: str) -> Iterator[str]:
    for name in names:
        if name in request.body and _sent(request.body[name]):
            yield name


def _messages(body: Mapping[str, Any]) -> list[Any]:
    messages = body.get("messages")
    return messages if isinstance(messages, list) else []


# --------------------------------------------------------------------------- detectors


def _completions(request: _Request) -> Iterator[str]:
    if request.completions:
        yield "prompt"


def _assistant_prefill(request: _Request) -> Iterator[str]:
    if not request.chat:
        return
    body = request.body
    if _true_or_odd(body.get("continue_final_message")):
        yield "continue_final_message"
    if _false_or_odd(body.get("add_generation_prompt")):
        yield "add_generation_prompt"
    messages = _messages(body)
    if messages and isinstance(messages[-1], Mapping):
        role = messages[-1].get("role")
        if not isinstance(role, str) or role.strip().casefold() == "assistant":
            yield "messages"
    chat_template = body.get("chat_template")
    if chat_template is not None and chat_template != "":  # "" falls back to the server's template
        yield "chat_template"
    yield from _present(request, "chat_template_kwargs")


def _named(request: _Request, name: str) -> Iterator[str]:
    yield from _present(request, name)


def _structured_outputs(request: _Request) -> Iterator[str]:
    body = request.body
    if body.get("structured_outputs") is not None:  # even {} (vLLM refuses a constraint-less one)
        yield "structured_outputs"
    response_format = body.get("response_format")
    if response_format is not None and not (
        isinstance(response_format, Mapping) and response_format.get("type") == "text"
    ):
        yield "response_format"
    if request.chat and body.get("tool_choice", "none") not in (None, "none", "auto"):
        yield "tool_choice"
    for name in _GUIDED_FIELDS:
        if body.get(name) is not None:
            yield name


def _embeds_part(part: Any) -> bool:
    if not isinstance(part, Mapping):
        return False
    kind = part.get("type")
    return (isinstance(kind, str) and kind in _EMBEDS_PARTS) or any(key in part for key in _EMBEDS_PARTS)


def _prompt_embeds(request: _Request) -> Iterator[str]:
    if request.completions:
        yield from _present(request, "prompt_embeds")
    if request.chat:
        for message in _messages(request.body):
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, list) and any(_embeds_part(part) for part in content):
                yield "messages"
                return


def _n(request: _Request) -> Iterator[str]:
    for name in ("n", "best_of"):
        if _int_other_than(request.body.get(name), default=1, used=lambda v: v > 1):
            yield name


def _lora(request: _Request) -> Iterator[str]:
    if not request.base_models:
        return
    model = request.body.get("model")
    if model is None or model == "":  # vLLM serves the base model
        return
    if not isinstance(model, str) or model not in request.base_models:
        yield "model"


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if headers is None:
        return None
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    return value


def _priority(request: _Request) -> Iterator[str]:
    if _int_other_than(request.body.get("priority"), default=0, used=lambda v: True):
        yield "priority"
    header = _header(request.headers, PRIORITY_HEADER)
    if header is not None:
        try:
            if int(header) != 0:  # as vLLM reads it (a header it cannot read is ignored)
                yield PRIORITY_HEADER
        except ValueError:
            pass


def _transfer(request: _Request) -> Iterator[str]:
    yield from _present(request, "kv_transfer_params", "ec_transfer_params")


def _table(*controls: Control) -> Mapping[str, Control]:
    return MappingProxyType({control.name: control for control in controls})


CONTROLS: Mapping[str, Control] = _table(
    Control(
        "completions",
        ("prompt",),
        "the raw /v1/completions route: a prompt without the chat template",
        _completions,
    ),
    Control(
        "assistant_prefill",
        ("continue_final_message", "add_generation_prompt", "messages", "chat_template", "chat_template_kwargs"),
        "an assistant turn written by the client, or a client chat template",
        _assistant_prefill,
    ),
    Control("logit_bias", ("logit_bias",), "biases on chosen tokens' logits", lambda r: _named(r, "logit_bias")),
    Control("bad_words", ("bad_words",), "words the model may not generate", lambda r: _named(r, "bad_words")),
    Control(
        "allowed_token_ids",
        ("allowed_token_ids",),
        "the only tokens the model may generate",
        lambda r: _named(r, "allowed_token_ids"),
    ),
    Control(
        "structured_outputs",
        ("structured_outputs", "response_format", "tool_choice", *_GUIDED_FIELDS),
        "output constrained to a grammar, schema, regex or choice (incl. JSON modes and forced tool calls)",
        _structured_outputs,
    ),
    Control(
        "prompt_embeds",
        ("prompt_embeds", "messages"),
        "input embeddings instead of tokens",
        _prompt_embeds,
    ),
    Control("n", ("n", "best_of"), "more than one sample per prompt", _n),
    Control("lora", ("model",), "a LoRA adapter instead of the base model", _lora),
    Control("priority", ("priority", PRIORITY_HEADER), "a scheduling priority other than 0", _priority),
    Control(
        "kv_transfer_params",
        ("kv_transfer_params", "ec_transfer_params"),
        "KV or encoder cache computed elsewhere (disaggregated serving)",
        _transfer,
    ),
)
CONTROL_NAMES: tuple[str, ...] = tuple(CONTROLS)


def used_controls(
    body: Mapping[str, Any],
    path: str,
    base_models: Collection[str],
    headers: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """``(control, field)`` for every control the request uses and each field it uses it through, in table order.

    ``path``: ``"/v1/completions"`` or ``"/v1/chat/completions"`` (any other path is read as either);
    ``base_models``: the served base model names (empty: unknown, ``lora`` is not checked); ``headers``:
    the request's headers, for vLLM's priority header.
    """
    chat, completions = path == CHAT_PATH, path == COMPLETIONS_PATH
    if not chat and not completions:
        chat = completions = True
    request = _Request(body, chat, completions, base_models, headers)
    return [(control.name, name) for control in CONTROLS.values() for name in control.detector(request)]


def _count(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, (str, bytes, dict)):
        return 1
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):  # one prompt of token ids
            return 1
        return len(value)
    return 1


def _samples(body: Mapping[str, Any]) -> int:
    most = 1
    for name in ("n", "best_of"):
        value = body.get(name)
        parsed = 1 if value is None else _lax(_INT, value)
        if isinstance(parsed, int) and parsed > most:
            most = parsed
    return most


def rows(body: Mapping[str, Any], path: str) -> int:
    """How many sequences the request asks the engine to generate: ``max(n, best_of)`` times the number of
    prompts (``/v1/completions``: a list of strings or of token-id lists counts its length, plus
    ``prompt_embeds``), at least 1 and at most :data:`MAX_ROWS`. A value vLLM will refuse counts as 1."""
    prompts = 1
    if path != CHAT_PATH:
        prompts = max(1, _count(body.get("prompt")) + _count(body.get("prompt_embeds")))
    samples = min(_samples(body), MAX_ROWS)
    return max(1, min(MAX_ROWS, samples * min(prompts, MAX_ROWS)))
