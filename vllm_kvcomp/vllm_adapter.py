"""The one place where vllm-kvcomp patches vLLM.

Everything else plugs into vLLM 0.25.1 through its extension points (worker_cls,
scheduler_cls, the CUSTOM attention backend, KVCacheSpecRegistry). Three
methods of `EngineArgs` are wrapped here because vLLM has no hook for new
command-line flags, and one of the front end's `InputProcessor` because its
only per-request validation hook (logits-processor plugins) would switch the
V2 model runner off:

  * `add_cli_args`: adds `--kv-compression`, `--kv-budget`, `--kv-compression-config`.
  * `from_cli_args`: validates them and stores the merged config in
    `additional_config["kv_compression"]` (pickled to engine core and workers).
  * `create_engine_config`: refuses what compression cannot honour, forces what
    it needs (prefix caching off, the plugin's attention backend, worker and
    scheduler) and logs each forced change.
  * `InputProcessor._validate_params`: rejects a request whose per-request
    `kv_compression` / `kv_budget` (SamplingParams.extra_args, the OpenAI API's
    `vllm_xargs`) is invalid, before it reaches the engine (HTTP 400).

`install()` runs in every vLLM process (general plugin) and is idempotent.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vllm_kvcomp import SUPPORTED_VLLM_VERSION
from vllm_kvcomp.config import (
    ADDITIONAL_CONFIG_KEY,
    CompressionConfig,
    CompressionConfigError,
    build_config,
    from_additional_config,
    method_names,
    request_config,
)
from vllm_kvcomp.engine import requirements
from vllm_kvcomp.engine.requirements import ATTENTION_BACKEND_PATH
from vllm_kvcomp.policies import policy_classes
from vllm_kvcomp.request_options import has_request_keys

logger = logging.getLogger("vllm.kvcomp")

_WRAPPED_MARK = "_vllm_kvcomp_wrapped"
_FLAG_DESTS = ("kv_compression", "kv_budget", "kv_compression_config")


def check_vllm_version() -> str:
    import vllm

    found = getattr(vllm, "__version__", "unknown")
    if found != SUPPORTED_VLLM_VERSION:
        raise RuntimeError(
            f"vllm-kvcomp supports vLLM {SUPPORTED_VLLM_VERSION} only, found vLLM {found}: "
            f"install vllm=={SUPPORTED_VLLM_VERSION} or uninstall vllm-kvcomp"
        )
    return found


def install() -> None:
    """Hook the plugin into vLLM (every process; idempotent).

    On another vLLM version the plugin stays inert: one warning, nothing of
    vLLM is touched except that its flags (and an `additional_config`
    asking for compression) are refused with the version error, so unrelated
    vLLM processes on the same machine keep working.
    """
    try:
        check_vllm_version()
    except RuntimeError as mismatch:
        logger.warning("%s; the plugin stays off", mismatch)
        _refuse_compression_requests(str(mismatch))
        return
    _wrap_engine_args()
    _wrap_request_validation()
    _register_attention_backend()
    _register_kv_cache_spec()


def _refuse_compression_requests(reason: str) -> None:
    """On an unsupported vLLM: accept the flags only to refuse them with `reason`."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        if getattr(EngineArgs, _WRAPPED_MARK, False):
            return
        original_add_cli_args = EngineArgs.add_cli_args
        original_from_cli_args = EngineArgs.from_cli_args.__func__
        original_create_engine_config = EngineArgs.create_engine_config

        def add_cli_args(parser, *args, **kwargs):
            return add_compression_args(original_add_cli_args(parser, *args, **kwargs))

        def from_cli_args(cls, args, *rest, **kwargs):
            if any(getattr(args, name, None) is not None for name in _FLAG_DESTS):
                raise CompressionConfigError(reason)
            return original_from_cli_args(cls, args, *rest, **kwargs)

        def create_engine_config(self, *args, **kwargs):
            if (getattr(self, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY):
                raise CompressionConfigError(reason)
            return original_create_engine_config(self, *args, **kwargs)

        EngineArgs.add_cli_args = staticmethod(add_cli_args)
        EngineArgs.from_cli_args = classmethod(from_cli_args)
        EngineArgs.create_engine_config = create_engine_config
        setattr(EngineArgs, _WRAPPED_MARK, True)
    except Exception as exc:  # an unknown vLLM must never fail because the plugin is installed
        logger.warning("vllm-kvcomp: could not add its flags to this vLLM (%s); they are unavailable", exc)


# --- command line ---------------------------------------------------------------


def add_compression_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # `vllm serve --help` lists only group titles and descriptions, so the
    # description names the flags; `--help=KVCompression` shows them in full.
    group = parser.add_argument_group(
        title="KVCompression",
        description="vllm-kvcomp: --kv-compression METHOD, --kv-budget B, "
        "--kv-compression-config PATH. Per-layer KV cache eviction after prefill; freed "
        "blocks go back to the scheduler so more requests fit.",
    )
    group.add_argument(
        "--kv-compression",
        choices=method_names(),
        default=None,
        help="Per-layer budget method (README's methods table): "
        + "; ".join(f"{name}: {cls.source}" for name, cls in policy_classes().items())
        + ". none: stock vLLM (the default, or the method of --kv-compression-config). profile "
        "needs the YAML of `vllm-kvcomp calibrate` (--kv-compression-config).",
    )
    group.add_argument(
        "--kv-budget",
        default=None,
        help="Tokens kept per layer on average: a fraction of the prompt in (0, 1] "
        "(e.g. 0.2) or an integer token count (e.g. 2048). Default: the method's YAML (0.2).",
    )
    group.add_argument(
        "--kv-compression-config",
        default=None,
        metavar="PATH",
        help="YAML file with every other compression option (observation window, "
        "pooling, sink and recent tokens, zigzag tau, simlayer threshold, metrics port...); "
        "see configs/*.yaml, and configs/profiles/*.yaml for calibrated profiles. Flags "
        "override the file.",
    )
    return parser


def config_from_cli_args(args: argparse.Namespace, additional_config: dict[str, Any] | None) -> CompressionConfig:
    """Merge the three flags with whatever `--additional-config` already carries."""
    existing = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    overrides = existing if isinstance(existing, dict) else None
    method = getattr(args, "kv_compression", None)
    if method is None and isinstance(existing, str):
        method = existing
    return build_config(
        method=method,
        budget=getattr(args, "kv_budget", None),
        config_path=getattr(args, "kv_compression_config", None),
        overrides=overrides,
    )


def _wrap_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, _WRAPPED_MARK, False):
        return
    original_add_cli_args = EngineArgs.add_cli_args
    original_from_cli_args = EngineArgs.from_cli_args.__func__
    original_create_engine_config = EngineArgs.create_engine_config

    def add_cli_args(parser):
        return add_compression_args(original_add_cli_args(parser))

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original_from_cli_args(cls, args)
        flags_given = any(getattr(args, name, None) is not None for name in _FLAG_DESTS)
        if flags_given:
            config = config_from_cli_args(args, engine_args.additional_config)
            engine_args.additional_config = {
                **(engine_args.additional_config or {}),
                ADDITIONAL_CONFIG_KEY: config.model_dump(),
            }
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        config = from_additional_config(self.additional_config)
        if not config.enabled:
            return original_create_engine_config(self, *args, **kwargs)
        # Store the resolved config so engine core and workers read the same values.
        self.additional_config = {**(self.additional_config or {}), ADDITIONAL_CONFIG_KEY: config.model_dump()}
        requirements.prepare_engine_args(self, config)
        vllm_config = original_create_engine_config(self, *args, **kwargs)
        requirements.check_vllm_config(vllm_config, config)
        requirements.install_engine_classes(vllm_config)
        if config.enabled:
            from vllm_kvcomp.engine.metrics import expose_on_vllm_metrics

            expose_on_vllm_metrics()  # before the engine process starts: it inherits the location
        logger.info(
            "vllm-kvcomp: KV compression %s, budget %s, window %d, sinks %d, recent %d",
            config.method,
            config.budget,
            config.window,
            config.num_sinks,
            config.num_recent,
        )
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    setattr(EngineArgs, _WRAPPED_MARK, True)


def validate_request(vllm_config, params) -> None:
    """Raise VLLMValidationError (HTTP 400, logged without a traceback) for a bad per-request override."""
    extra_args = getattr(params, "extra_args", None)
    if not has_request_keys(extra_args):
        return
    model_config = getattr(vllm_config, "model_config", None)
    block_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
    try:
        request_config(
            _server_config(vllm_config), extra_args, getattr(model_config, "max_model_len", None), block_size=block_size
        )
    except CompressionConfigError as err:
        from vllm.exceptions import VLLMValidationError

        # vLLM's handler for VLLMValidationError answers 400 without the
        # "Exception in ASGI application" traceback a plain ValueError gets.
        raise VLLMValidationError(str(err), parameter="vllm_xargs") from None


def _server_config(vllm_config) -> CompressionConfig:
    """The server's config, resolved once per VllmConfig (not per request)."""
    cached = getattr(vllm_config, "_vllm_kvcomp_config", None)
    if cached is None:
        cached = from_additional_config(getattr(vllm_config, "additional_config", None))
        try:
            object.__setattr__(vllm_config, "_vllm_kvcomp_config", cached)
        except (AttributeError, TypeError):
            pass
    return cached


def _wrap_request_validation() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, _WRAPPED_MARK, False):
        return
    original_validate = InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        original_validate(self, params, *args, **kwargs)
        validate_request(self.vllm_config, params)

    InputProcessor._validate_params = _validate_params
    setattr(InputProcessor, _WRAPPED_MARK, True)


# --- extension-point registrations -------------------------------------------------


def _register_attention_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, ATTENTION_BACKEND_PATH)


def _register_kv_cache_spec() -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_kvcomp.engine.kv_cache import CompressedAttentionManager, CompressedAttentionSpec

    # Built-ins register lazily on first use, and only when the registry is
    # empty: fill it first, or registering ours would hide them.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        CompressedAttentionSpec,
        CompressedAttentionManager,
        uniform_type_base_spec=FullAttentionSpec,
    )


__all__ = ["install", "check_vllm_version", "add_compression_args", "validate_request", "CompressionConfigError"]
