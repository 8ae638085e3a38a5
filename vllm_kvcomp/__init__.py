"""vllm-kvcomp: per-layer, block-granular KV cache eviction for vLLM 0.25.1.

`register()` is the `vllm.general_plugins` entry point: vLLM calls it in every
process (API server, engine core, workers) before it parses arguments or
builds engines. It must stay idempotent and cheap.
"""

__version__ = "0.1.0"

SUPPORTED_VLLM_VERSION = "0.25.1"

_registered = False


def register() -> None:
    """Entry point of the `vllm.general_plugins` group (see pyproject.toml)."""
    global _registered
    if _registered:
        return
    from vllm_kvcomp import vllm_adapter

    vllm_adapter.install()
    _registered = True
