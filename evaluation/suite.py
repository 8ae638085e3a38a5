"""Which configurations an evaluation runs: registered methods and operator presets, at every budget.

`--methods` takes registered method names (`uniform`, `zigzag`, ...) and the names of presets
in the `--kv-compression-config` YAML's `presets` mapping
(`presets: {zigzag_shrink50: {method: zigzag, zigzag: {...}}}`). Configurations are keyed
"<name>@<budget>" ("none": full KV); the part before "@" is what rows report as `method` and
what a vLLM request names in `kv_compression` (a preset travels by name, the engine resolves it).

The YAML is read here with yaml.safe_load as well, so this works whether or not the installed
plugin's config knows `presets` yet: if the config refuses the key, the scorer options are taken
from the YAML without it, and a preset is built locally from its mapping (the CPU path can run it;
the vLLM path refuses it up front, since the engine would refuse every such request).
"""

from __future__ import annotations

from typing import Any

from vllm_kvcomp.config import CompressionConfig, build_config, load_yaml, method_names
from vllm_kvcomp.errors import CompressionConfigError
from vllm_kvcomp.request_options import request_config

NO_METRICS = {"metrics_port": None}


def label(config_name: str) -> str:
    """The row's `method` (a method or preset name) of a configuration key "<name>@<budget>"."""
    return config_name.partition("@")[0]


def read_presets(config_path: str | None) -> tuple[dict[str, Any], dict[str, dict]]:
    """(the YAML without `presets`, the `presets` mapping) of `--kv-compression-config`."""
    if not config_path:
        return {}, {}
    data = dict(load_yaml(config_path))  # yaml.safe_load; a missing or malformed file is a one-line error
    presets = data.pop("presets", None) or {}
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise CompressionConfigError(f"{config_path}: presets must map each name to a mapping of options")
    return data, presets


def server_config(config_path: str | None) -> CompressionConfig:
    """The engine's config: the YAML's scorer options, method uniform (requests name theirs).

    The YAML goes to the plugin as is when its config accepts it (presets included, so the
    engine can resolve them); otherwise without `presets`.
    """
    base, presets = read_presets(config_path)
    try:
        return build_config(method="uniform", config_path=config_path, overrides=NO_METRICS)
    except CompressionConfigError:
        if not presets:
            raise
    return build_config(method="uniform", overrides={**base, **NO_METRICS})


def engine_config(server: CompressionConfig, name: str, budget: float) -> CompressionConfig | str:
    """What the engine runs for a request {kv_compression: name, kv_budget: budget}, or why it refuses."""
    try:
        return request_config(server, {"kv_compression": name, "kv_budget": budget})
    except CompressionConfigError as err:
        return str(err)


def local_preset_config(base: dict[str, Any], preset: dict[str, Any], budget: float) -> CompressionConfig:
    """A preset's config built from its own mapping over the YAML's options (what the CPU path runs)."""
    options = {k: v for k, v in preset.items() if k != "method"}
    overrides = {**base, **NO_METRICS}
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    return build_config(method=preset.get("method", "none"), budget=budget, overrides=overrides)


def _preset_config(server, base, presets, name: str, budget: float, engine: bool) -> CompressionConfig:
    accepted = engine_config(server, name, budget)
    if isinstance(accepted, CompressionConfig):
        return accepted
    if engine:
        raise CompressionConfigError(f"preset {name!r}: the installed plugin refuses it per request: {accepted}")
    return local_preset_config(base, presets[name], budget)


def build_configs(
    names: list[str], budgets: list[float], config_path: str | None, *, engine: bool
) -> tuple[CompressionConfig, dict[str, CompressionConfig], dict[str, dict]]:
    """(server config, {"none" | "<name>@<budget>": config}, the presets used).

    A preset's config is the one the plugin's per-request check returns for it (what the engine
    runs). If the plugin refuses it: engine=True (vLLM path) stops before the engine starts;
    engine=False (CPU path) builds it from the preset's mapping over the YAML's options.
    """
    base, presets = read_presets(config_path)
    server = server_config(config_path)
    registered = method_names()
    unknown = [n for n in names if n not in registered and n not in presets]
    if unknown:
        known = ", ".join([*registered, *presets])
        raise CompressionConfigError(f"--methods: unknown method or preset {unknown[0]!r}; choose from {known}")
    configs = {"none": server.model_copy(update={"method": "none"})}
    for name in (n for n in names if n != "none"):
        for budget in budgets:
            if name in registered:
                config = build_config(method=name, budget=budget, overrides={**base, **NO_METRICS})
            else:
                config = _preset_config(server, base, presets, name, budget, engine)
            configs[f"{name}@{budget:g}"] = config
    return server, configs, {n: presets[n] for n in names if n in presets}
