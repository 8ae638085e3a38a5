"""Which configurations an evaluation runs: registered methods and operator presets, at every budget.

`--methods` takes registered method names (`uniform`, `zigzag`, ...) and the names of presets
in the `--kv-compression-config` YAML's `presets` mapping
(`presets: {zigzag_shrink50: {method: zigzag, zigzag: {...}}}`). Configurations are keyed
"<name>@<budget>" ("none": full KV); the part before "@" is what rows report as `method` and
what a vLLM request names in `kv_compression` (a preset travels by name, the engine resolves it).

A preset's configuration is the one the plugin's per-request check returns for it, which is
what the engine runs (the CPU path runs the same); a preset the check refuses stops the run
before any engine starts, since the engine would refuse every such request.
"""

from __future__ import annotations

from typing import Any

from vllm_kvcomp.config import CompressionConfig, build_config, method_names
from vllm_kvcomp.errors import CompressionConfigError
from vllm_kvcomp.request_options import request_config

NO_METRICS = {"metrics_port": None}


def label(config_name: str) -> str:
    """The row's `method` (a method or preset name) of a configuration key "<name>@<budget>"."""
    return config_name.partition("@")[0]


def server_config(config_path: str | None) -> CompressionConfig:
    """The engine's config: the YAML's scorer options and presets, method uniform (requests name theirs)."""
    return build_config(method="uniform", config_path=config_path, overrides=NO_METRICS)


def engine_config(server: CompressionConfig, name: str, budget: float) -> CompressionConfig | str:
    """What the engine runs for a request {kv_compression: name, kv_budget: budget}, or why it refuses."""
    try:
        return request_config(server, {"kv_compression": name, "kv_budget": budget})
    except CompressionConfigError as err:
        return str(err)


def _preset_config(server: CompressionConfig, name: str, budget: float) -> CompressionConfig:
    accepted = engine_config(server, name, budget)
    if isinstance(accepted, str):
        raise CompressionConfigError(f"preset {name!r}: the installed plugin refuses it per request: {accepted}")
    return accepted


def build_configs(
    names: list[str], budgets: list[float], config_path: str | None
) -> tuple[CompressionConfig, dict[str, CompressionConfig], dict[str, dict[str, Any]]]:
    """(server config, {"none" | "<name>@<budget>": config}, the presets used, as in the YAML)."""
    server = server_config(config_path)
    registered = method_names()
    unknown = [n for n in names if n not in registered and n not in server.presets]
    if unknown:
        known = ", ".join([*registered, *server.presets])
        raise CompressionConfigError(f"--methods: unknown method or preset {unknown[0]!r}; choose from {known}")
    configs = {"none": server.model_copy(update={"method": "none"})}
    for name in (n for n in names if n != "none"):
        for budget in budgets:
            if name in registered:
                config = build_config(method=name, budget=budget, config_path=config_path, overrides=NO_METRICS)
            else:
                config = _preset_config(server, name, budget)
            configs[f"{name}@{budget:g}"] = config
    return server, configs, {n: server.presets[n].model_dump() for n in names if n in server.presets}
