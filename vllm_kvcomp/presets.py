"""Operator-defined presets: a name for one method with some of its options.

An operator lists them in the server's YAML and clients pick one per request
with `kv_compression: <preset>` (README, "Per-request method and budget"), so
variants are compared (A/B) on one running server:

    presets:
      zigzag_shrink50: {method: zigzag, zigzag: {shrink: 0.5}}

Rules (each refusal is one line naming `presets.<name>...`):
  * a name is lowercase [a-z0-9_-], at most 40 characters, and not a method name
    nor "none";
  * `method` is a registered method (not "none"); the only other key allowed is
    that method's own option section;
  * options that change the statistics the engine computes once per batch with
    the server's config (each method's `Options.server_only`: zigzag `tau` and
    `mba_scope`, simlayer `recent`) stay the server's and are refused;
  * a request served with a preset runs the server's config with `method` set to
    the preset's method and the preset's options laid over the server's section
    of that method (the options the preset does not set keep the server's values).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from vllm_kvcomp.config import CompressionConfig

NAME = re.compile(r"[a-z0-9_-]{1,40}")
_SHAPE = "a mapping like {method: zigzag, zigzag: {shrink: 0.5}}"


class Preset(BaseModel):
    """One preset: `method` and, under the method's name, the options it sets (only those)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str

    @property
    def options(self) -> dict[str, Any]:
        """The options the preset sets, as given (validated by the method's `Options`)."""
        return dict((self.model_extra or {}).get(self.method) or {})


def check_presets(value: Any) -> dict[str, Preset]:
    """The `presets` of a config, validated; raise ValueError (one line) otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"presets: must be a mapping of preset names to {_SHAPE}")
    return {_check_name(name): _check_preset(name, body) for name, body in value.items()}


def _check_name(name: Any) -> str:
    from vllm_kvcomp.policies import method_names

    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = str(name) if len(str(name)) <= 40 else str(name)[:37] + "..."
        raise ValueError(f"presets.{shown}: a preset name is lowercase letters, digits, '_' or '-', 1-40 characters")
    if name in method_names():
        raise ValueError(f"presets.{name}: a preset cannot be named after a method ({', '.join(method_names())})")
    return name


def _check_preset(name: str, body: Any) -> Preset:
    from vllm_kvcomp.policies import policy_classes
    from vllm_kvcomp.request_options import shorten

    if isinstance(body, Preset):
        body = body.model_dump()
    if not isinstance(body, dict):
        raise ValueError(f"presets.{name}: must be {_SHAPE}")
    methods = policy_classes()
    method = body.get("method")
    if method is None:
        raise ValueError(f"presets.{name}.method: missing; one of {', '.join(methods)}")
    if not isinstance(method, str) or method not in methods:
        raise ValueError(f"presets.{name}.method: must be one of {', '.join(methods)}, got {shorten(method)}")
    for key in body:
        if key not in ("method", method):
            raise ValueError(f"presets.{name}.{key}: unknown option; a preset holds `method` and `{method}` options")
    section = body.get(method)
    if section is None:
        return Preset(method=method)
    options = _check_section(f"presets.{name}.{method}", methods[method].Options, section)
    return Preset.model_validate({"method": method, method: options})


def _check_section(where: str, options_model: Any, section: Any) -> dict[str, Any]:
    """The options a preset sets, validated by the method's `Options`; server-only ones refused."""
    from vllm_kvcomp.config import section_error

    if options_model is None:
        raise ValueError(f"{where}: this method has no options")
    if not isinstance(section, dict):
        raise ValueError(f"{where}: must be a mapping of options")
    for key in section:
        why = options_model.server_only.get(key)
        if why:
            raise ValueError(f"{where}.{key}: cannot be set in a preset ({why}); set it in the server's config")
    try:
        options = options_model.model_validate(section)
    except ValidationError as err:
        raise ValueError(section_error(where, err)) from None
    return options.model_dump(include=options.model_fields_set)


def preset_update(server: CompressionConfig, preset: Preset) -> dict[str, Any]:
    """The fields of `server` a request served with `preset` changes: the method and its section."""
    update: dict[str, Any] = {"method": preset.method}
    if preset.options:
        update[preset.method] = {**server.section(preset.method).model_dump(), **preset.options}
    return update


def check_resolvable(server: CompressionConfig) -> None:
    """Every preset gives a valid config on this server (e.g. `profile` needs its weights)."""
    from vllm_kvcomp.config import CompressionConfig, error_line

    base = server.model_dump(exclude={"presets"})
    for name, preset in server.presets.items():
        try:
            CompressionConfig.model_validate({**base, **preset_update(server, preset)})
        except ValidationError as err:
            raise ValueError(f"presets.{name}: {error_line(err)}") from None
