"""Per-request method and budget: `SamplingParams.extra_args` (OpenAI API: `vllm_xargs`).

The rules (README, "Per-request method and budget"):
  * Keys: `kv_compression`, `kv_budget` and `kv_evict_every`. Any other key starting with `kv_` is
    refused, so a typo (`kv_budjet`) is never silently ignored; keys without
    that prefix belong to other consumers and are left alone.
  * `kv_compression`: a string naming a registered method, "none" (full KV), or
    one of the server's presets (vllm_kvcomp/presets.py): the preset's method with
    its options. `request_overrides: budget` lets a request pick a preset only
    when the preset's method is the server's (the operator defined it).
  * `kv_budget`: a JSON number or a numeric string (form fields arrive as
    strings), never a boolean: a fraction in (0, 1] or an integer token count
    from num_sinks + num_recent up to the server's max_model_len. The integer 1
    is refused as ambiguous (vLLM's API schema turns `true` into 1): write 1.0.
  * `kv_evict_every` (lifetime budgets, docs/LIFETIME-BUDGETS.md): tokens between
    decode-time evictions of this request, an integer (or integer string) >=
    decode_window, a multiple of the KV block size (when the caller knows it:
    the front end does), at most the server option's limit; "off" or null: no
    decode-time eviction for it. Only on a server started with `evict_every`
    (the decode-query ring is allocated at start); "off" is then refused under
    `request_overrides: budget` (compression cannot be switched off there).
  * The operator's policy (server config): `request_overrides` (allow | budget |
    deny), `min_request_fraction`, `min_request_tokens`.
  * A server started without --kv-compression refuses requests that ask for
    compression (it never serves them uncompressed silently).
Every refusal is a `CompressionConfigError` (a ValueError: HTTP 400) of one short
line that names the key; the offending value is quoted shortened.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vllm_kvcomp.errors import CompressionConfigError

if TYPE_CHECKING:
    from vllm_kvcomp.config import CompressionConfig

# Keys a request may set; they mirror the server flags --kv-compression and --kv-budget.
REQUEST_KEYS = ("kv_compression", "kv_budget", "kv_evict_every")
KEY_PREFIX = "kv_"
# Token budgets beyond this are refused when the model's max_model_len is unknown.
MAX_TOKEN_BUDGET = 2**31 - 1
MAX_EVICT_EVERY = 1 << 20  # CompressionConfig.evict_every's limit
_SHOWN_CHARS = 40


def shorten(value: Any) -> str:
    """repr(value), cut to a few dozen characters (messages never echo unbounded input)."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _refuse(key: str, why: str) -> CompressionConfigError:
    return CompressionConfigError(f"{key} (request): {why}")


def has_request_keys(extra_args: dict[str, Any] | None) -> bool:
    return bool(extra_args) and any(isinstance(k, str) and k.startswith(KEY_PREFIX) for k in extra_args or {})


def parse_request_budget(value: Any, server: CompressionConfig, max_tokens: int | None) -> float:
    """A request's `kv_budget` as a number, or a one-line refusal."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _refuse("kv_budget", f"expected a number, got {shorten(value)}")
    if isinstance(value, int) and value == 1:
        # JSON `true` reaches the engine as the integer 1 (vLLM's vllm_xargs schema coerces it).
        raise _refuse("kv_budget", "the integer 1 is ambiguous: use 1.0 to keep whole prompts, or a token count")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (ValueError, OverflowError):
        raise _refuse("kv_budget", f"expected a fraction in (0, 1] or a token count, got {shorten(value)}") from None
    if not math.isfinite(number) or number <= 0:
        raise _refuse("kv_budget", f"must be a finite number > 0, got {shorten(value)}")
    if number <= 1:
        if number < server.min_request_fraction:
            raise _refuse("kv_budget", f"this server keeps at least {server.min_request_fraction:g} of each prompt")
        return number
    limit = max_tokens or MAX_TOKEN_BUDGET
    if number != int(number) or number > limit:
        raise _refuse("kv_budget", f"a token count must be an integer <= {limit}, got {shorten(value)}")
    if number < max(server.min_request_tokens, server.protected_tokens):
        floor = max(server.min_request_tokens, server.protected_tokens)
        raise _refuse("kv_budget", f"this server keeps at least {floor} tokens per layer, got {int(number)}")
    return number


def parse_request_evict_every(value: Any, server: CompressionConfig, block_size: int | None = None) -> int | None:
    """A request's `kv_evict_every` as tokens, None for "off"/null, or a one-line refusal."""
    key = "kv_evict_every"
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        if server.request_overrides == "budget" and server.evict_every is not None:
            raise _refuse(key, "this server does not let requests turn decode-time eviction off")
        return None
    if server.evict_every is None:
        raise _refuse(key, "this server evicts only after the prefill; decode-time eviction needs evict_every set")
    number = _integer(value)
    if number is None:
        raise _refuse(key, f'expected an integer token count or "off", got {shorten(value)}')
    if number < server.decode_window or number > MAX_EVICT_EVERY:
        # decode_window: the ring's stored LSE is exact only if no eviction ran since (config.py).
        raise _refuse(key, f"must be from decode_window ({server.decode_window}) to {MAX_EVICT_EVERY}, got {number}")
    if block_size and number % block_size:
        raise _refuse(key, f"must be a multiple of the KV block size ({block_size}), got {number}")
    return number


def _integer(value: Any) -> int | None:
    """An int, or a string of one (form fields arrive as strings); never a bool or a float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdecimal() and len(value) <= _SHOWN_CHARS:
        return int(value.strip())
    return None


def _method(value: Any, server: CompressionConfig) -> dict[str, Any]:
    """The fields a request's `kv_compression` (a method or a preset of the server) changes."""
    from vllm_kvcomp.config import method_names
    from vllm_kvcomp.presets import preset_update

    names = method_names()
    preset = server.presets.get(value) if isinstance(value, str) else None
    if preset is None and (not isinstance(value, str) or value not in names):
        presets = f"; presets: {', '.join(server.presets)}" if server.presets else ""
        raise _refuse("kv_compression", f"unknown method {shorten(value)}; choose one of {', '.join(names)}{presets}")
    method = preset.method if preset is not None else value
    if server.request_overrides != "allow" and method != server.method:
        raise _refuse("kv_compression", f"this server does not let requests change the method ({server.method})")
    return preset_update(server, preset) if preset is not None else {"method": value}


def _check_keys(extra_args: dict[str, Any], server: CompressionConfig) -> None:
    unknown = [k for k in extra_args if isinstance(k, str) and k.startswith(KEY_PREFIX) and k not in REQUEST_KEYS]
    if unknown:
        raise _refuse(shorten(unknown[0]).strip("'"), f"unknown key; per-request keys are {', '.join(REQUEST_KEYS)}")
    if server.request_overrides == "deny" and server.enabled:
        key = next(k for k in REQUEST_KEYS if k in extra_args)
        raise _refuse(key, "this server does not accept per-request compression settings")


def request_config(
    server: CompressionConfig,
    extra_args: dict[str, Any] | None,
    max_tokens: int | None = None,
    block_size: int | None = None,
) -> CompressionConfig:
    """The config one request runs with: the server's, or its method/budget/evict_every overridden.

    Only the method (with a preset: and that method's options), the budget and the
    decode-time eviction cadence can change per request: the scorer options (window,
    pooling, protected tokens, decode_window) size GPU buffers and are the server's.
    `max_tokens`: the model's max_model_len (the largest meaningful token budget);
    `block_size`: the KV block size (kv_evict_every must be a multiple of it).
    """
    extra_args = extra_args or {}
    if not has_request_keys(extra_args):
        return server
    _check_keys(extra_args, server)
    update: dict[str, Any] = {}
    if "kv_compression" in extra_args:
        update.update(_method(extra_args["kv_compression"], server))
    if "kv_budget" in extra_args:
        update["budget"] = parse_request_budget(extra_args["kv_budget"], server, max_tokens)
    if "kv_evict_every" in extra_args:
        update["evict_every"] = parse_request_evict_every(extra_args["kv_evict_every"], server, block_size)
    if not update:
        return server
    if not server.enabled and update.get("method", "none") != "none":
        raise _refuse(
            "kv_compression",
            "this server was started without --kv-compression, so its KV cache cannot be compressed per request; "
            "start it with --kv-compression METHOD",
        )
    if not server.enabled and "method" not in update:
        for key, field in (("kv_budget", "budget"), ("kv_evict_every", "evict_every")):
            if update.get(field) is not None:
                why = f"this server was started without --kv-compression; {field} needs a compressing server"
                raise _refuse(key, why)
    return _validated(server, update)


def _validated(server: CompressionConfig, update: dict[str, Any]) -> CompressionConfig:
    from vllm_kvcomp.config import CompressionConfig, format_validation_error

    try:
        # A request's config is one method's: the server's presets are not carried.
        return CompressionConfig.model_validate({**server.model_dump(exclude={"presets"}), **update})
    except ValidationError as err:
        raise CompressionConfigError(format_validation_error(err, "per-request kv_* keys")) from None
