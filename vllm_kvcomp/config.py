"""The compression config: pydantic models, loading and merging.

Precedence, lowest first: the packaged defaults of the method
(`configs/<method>.yaml`), the user's YAML (`--kv-compression-config`), then the
two flags `--kv-compression` and `--kv-budget`. The merged, validated config is
stored as a plain dict in `VllmConfig.additional_config["kv_compression"]`, which
vLLM pickles to the engine core and every worker.

Every validation error is a `CompressionConfigError` whose message is one line
naming the field and the allowed range.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_kvcomp.errors import CompressionConfigError
from vllm_kvcomp.presets import Preset, check_presets, check_resolvable

__all__ = ["CompressionConfig", "CompressionConfigError", "build_config", "from_additional_config", "request_config"]

ADDITIONAL_CONFIG_KEY = "kv_compression"


def method_names() -> tuple[str, ...]:
    """Every method `--kv-compression` accepts ("none" first), from the registry."""
    from vllm_kvcomp.policies import method_names as registered

    return registered()


def _policy_classes() -> dict[str, Any]:
    from vllm_kvcomp.policies import policy_classes

    return policy_classes()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CompressionConfig(_Section):
    """Everything the scorer, the budget policy and the eviction engine read.

    Besides the shared fields below, the config holds one option section per
    registered method that declares options (`zigzag: {tau: ...}`), validated by
    that method's own `Options` model; read one with `config.section("zigzag")`
    (or `config.zigzag`).
    """

    # Extra keys are allowed only as method sections (checked in `_method_sections`).
    model_config = ConfigDict(extra="allow", frozen=True)

    method: str = "none"
    # <= 1: fraction of the prompt kept per layer on average; integer > 1: tokens.
    budget: float = Field(0.2, description="fraction of the prompt in (0, 1], or an integer token count > 1")
    # SnapKV observation window: the last `window` prompt queries score the prompt.
    window: int = Field(32, ge=1, le=1024)
    # SnapKV pools scores with kernel 5-7; KV-Compress uses max pooling, kernel 7.
    pool_kernel: int = Field(7, ge=1, le=63)
    pool_type: Literal["max", "avg"] = "max"
    # KV-Compress squares the window attention probabilities before summing.
    square: bool = False
    # Always kept: the first `num_sinks` tokens (attention sinks, StreamingLLM: 4)...
    num_sinks: int = Field(4, ge=0, le=4096)
    # ...and the last `num_recent` prompt tokens (KV-Compress protects 64).
    num_recent: int = Field(64, ge=1, le=65536)
    # Prompts shorter than this are never compressed (0: whenever the budget is smaller).
    min_prompt_len: int = Field(0, ge=0)
    # Requests whose observation window is being captured at one time (GPU buffer slots).
    max_pending_requests: int = Field(16, ge=1, le=1024)
    # Inter-layer attention similarity (arXiv 2412.02252): adjacent layers attend alike, so
    # each group of `layer_share` layers is scored once, with its first layer's window, and
    # every layer of the group keeps the tokens those scores rank first (within its own
    # budget). 1: every layer scored (the default); k: about 1/k of the scoring work.
    layer_share: int = Field(1, ge=1, le=64)
    # Lifetime budgets (docs/LIFETIME-BUDGETS.md): evict again every `evict_every` generated tokens (a multiple of
    # the block size, >= decode_window), scored by the last `decode_window` decode queries. None: after prefill only.
    evict_every: int | None = Field(None, ge=16, le=1 << 20)
    decode_window: int = Field(16, ge=1, le=256)
    # Transient GPU memory of one eviction pass (reserved in vLLM's memory profile, engine/memory.py).
    eviction_workspace_mb: int = Field(256, ge=16, le=1 << 20)
    # The plugin's metrics are on vLLM's /metrics; `metrics_port` also serves them from the engine (None: off).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # What a request may change through SamplingParams.extra_args / vllm_xargs
    # (request_options.py): "allow" method and budget, "budget" only the budget
    # (compression cannot be switched off), "deny" nothing.
    request_overrides: Literal["allow", "budget", "deny"] = "allow"
    # The smallest budget a request may ask for: as a fraction of its prompt, and as tokens.
    min_request_fraction: float = Field(0.0, ge=0.0, le=1.0)
    min_request_tokens: int = Field(0, ge=0)
    # Named variants a request selects with `kv_compression: <name>` (vllm_kvcomp/presets.py):
    # {name: {method: M, M: {options}}}. A request's own config holds none.
    presets: dict[str, Preset] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _method_sections(cls, data: Any) -> Any:
        """Validate each method's section with its own model; default the missing ones."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data["presets"] = check_presets(data.get("presets"))
        sections = {name: policy.Options for name, policy in _policy_classes().items() if policy.Options}
        for key in data:
            if key not in cls.model_fields and key not in sections:
                raise ValueError(f"{key}: unknown option")
        for name, options_model in sections.items():
            value = data.get(name)
            if isinstance(value, BaseModel):
                value = value.model_dump()
            try:
                data[name] = options_model.model_validate(value if value is not None else {})
            except ValidationError as err:
                raise ValueError(section_error(name, err)) from None
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return check_method(value)

    def section(self, method: str) -> Any:
        """The option section of `method` (its policy's `Options` model)."""
        return getattr(self, method)

    @field_validator("budget")
    @classmethod
    def _budget_range(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"must be > 0 (a fraction in (0, 1] or a token count > 1), got {value}")
        if value > 1 and value != int(value):
            raise ValueError(f"a fraction must be in (0, 1]; a token count must be an integer > 1, got {value}")
        return value

    @field_validator("pool_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd (a window centred on each token), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompressionConfig:
        if self.window > self.num_recent:
            raise ValueError(
                f"window ({self.window}) must be <= num_recent ({self.num_recent}): "
                "the observation window is part of the protected recent tokens"
            )
        if self.evict_every is not None and self.evict_every < self.decode_window:
            raise ValueError(
                f"evict_every ({self.evict_every}) must be >= decode_window ({self.decode_window}): "
                "the decode queries' stored LSE is exact only if no eviction happened since they ran"
            )
        if self.is_absolute_budget and self.protected_tokens > self.budget:
            raise ValueError(
                f"budget ({int(self.budget)} tokens) is smaller than the always-kept "
                f"num_sinks + num_recent ({self.protected_tokens})"
            )
        policy = _policy_classes().get(self.method)
        if policy is not None:
            policy.check_config(self)
        check_resolvable(self)
        return self

    # --- derived values -------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def is_absolute_budget(self) -> bool:
        return self.budget > 1

    @property
    def protected_tokens(self) -> int:
        return self.num_sinks + self.num_recent

    def average_budget(self, prompt_len: int) -> int:
        """Tokens kept per layer on average for a prompt of `prompt_len` tokens.

        Never below the always-kept tokens and never above the prompt.
        """
        if self.is_absolute_budget:
            target = int(self.budget)
        else:
            target = math.ceil(self.budget * prompt_len)
        return min(prompt_len, max(target, self.protected_tokens))

    @property
    def evicts_while_decoding(self) -> bool:
        """Whether decode-time eviction can ever free a block: a method, `evict_every`, and a token
        budget or a fraction below 1 (a fraction of 1 keeps the whole context at every step)."""
        return self.enabled and self.evict_every is not None and (self.is_absolute_budget or self.budget < 1)

    @property
    def decode_ring_needed(self) -> bool:
        """Whether some request can evict while decoding: by this config, or by its own kv_* keys (a token
        budget always evicts) unless the server denies them. If not, the server has no decode-query ring."""
        requests_may = self.request_overrides != "deny"
        return self.enabled and self.evict_every is not None and (self.evicts_while_decoding or requests_may)

    def should_compress(self, prompt_len: int) -> bool:
        if not self.enabled or prompt_len < self.min_prompt_len:
            return False
        return self.average_budget(prompt_len) < prompt_len


# --- loading ------------------------------------------------------------------


def _error_text(first: Any) -> tuple[str, str]:
    """(dotted field, message) of one pydantic error."""
    field = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown option"
    elif first["type"] == "literal_error":
        msg = f"{msg}, got {first.get('input')!r}"
    return field, msg


def section_error(section: str, err: ValidationError) -> str:
    field, msg = _error_text(err.errors()[0])
    return f"{section}.{field}: {msg}" if field else f"{section}: {msg}"


def error_line(err: ValidationError) -> str:
    """'field: message' of the first error (model validators' errors carry their own field)."""
    field, msg = _error_text(err.errors()[0])
    return f"{field}: {msg}" if field else msg


def format_validation_error(err: ValidationError, source: str) -> str:
    return f"kv-compression config ({source}): {error_line(err)}"


def check_method(method: Any, source: str = "kv-compression") -> str:
    """`method` if it is a registered method (or "none"), else a one-line error naming `source`."""
    names = method_names()
    if method not in names:
        raise CompressionConfigError(f"{source}: unknown method {method!r}; choose one of {', '.join(names)}")
    return method


def packaged_defaults(method: str) -> dict[str, Any]:
    """The documented defaults of one method, from configs/<method>.yaml."""
    check_method(method)
    path = resources.files("vllm_kvcomp.configs").joinpath(f"{method}.yaml")
    if not path.is_file():  # a method without a documented YAML: the models' own defaults
        return {"method": method}
    return yaml.safe_load(path.read_text()) or {}


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CompressionConfigError(f"--kv-compression-config: no such file: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise CompressionConfigError(f"--kv-compression-config: {p} is not valid YAML: {exc}".splitlines()[0]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CompressionConfigError(f"--kv-compression-config: {p} must hold a mapping of options")
    return data


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_budget(text: str | float | int) -> float:
    """`--kv-budget`: '0.2' (fraction) or '2048' (tokens)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        raise CompressionConfigError(
            f"--kv-budget: expected a fraction in (0, 1] or an integer token count, got {text!r}"
        ) from None


def build_config(
    method: str | None = None,
    budget: float | str | None = None,
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> CompressionConfig:
    """Merge defaults < YAML < overrides < flags and validate."""
    user = load_yaml(config_path) if config_path else {}
    if overrides:
        user = _deep_merge(user, overrides)
    if method is not None:
        user["method"] = method
    if budget is not None:
        user["budget"] = parse_budget(budget)
    chosen = check_method(user.get("method", "none"))
    # A budget flag alone means the user forgot the method (a YAML or config may say "none").
    if chosen == "none" and budget is not None and method is None and config_path is None:
        raise CompressionConfigError(
            f"--kv-budget was given without --kv-compression METHOD; choose one of {', '.join(method_names()[1:])}"
        )
    merged = _deep_merge(packaged_defaults(chosen), user)
    source = str(config_path) if config_path else "flags"
    try:
        return CompressionConfig.model_validate(merged)
    except ValidationError as err:
        raise CompressionConfigError(format_validation_error(err, source)) from None


def from_additional_config(additional_config: dict[str, Any] | None) -> CompressionConfig:
    """Read the config from `VllmConfig.additional_config`.

    Accepted forms (the first is what the plugin itself stores):
      {"kv_compression": {"method": "zigzag", "budget": 0.2, ...}}
      {"kv_compression": "zigzag", "kv_budget": 0.2, "kv_compression_config": "x.yaml"}
    """
    additional_config = additional_config or {}
    entry = additional_config.get(ADDITIONAL_CONFIG_KEY)
    budget = additional_config.get("kv_budget")
    path = additional_config.get("kv_compression_config")
    if isinstance(entry, CompressionConfig):
        return entry
    if isinstance(entry, dict):
        return build_config(budget=budget, config_path=path, overrides=entry)
    if entry is None or isinstance(entry, str):
        if entry is None and budget is None and path is None:
            return CompressionConfig()
        return build_config(method=entry, budget=budget, config_path=path)
    raise CompressionConfigError(
        f"additional_config[{ADDITIONAL_CONFIG_KEY!r}] must be a method name or a mapping, got {type(entry).__name__}"
    )


# Per-request overrides live in vllm_kvcomp/request_options.py (re-exported here).
from vllm_kvcomp.request_options import request_config  # noqa: E402
