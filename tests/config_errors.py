"""Shared by the config tests: build a config that must fail, return its one-line message."""

import pytest

from vllm_kvcomp.config import CompressionConfigError, build_config


def config_error(**kwargs) -> str:
    with pytest.raises(CompressionConfigError) as info:
        build_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message
