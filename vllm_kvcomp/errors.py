"""The plugin's one error type for options it cannot accept."""


class CompressionConfigError(ValueError):
    """A compression option is invalid or cannot be honoured (one readable line).

    A ValueError, so vLLM's front end answers a bad per-request value with HTTP 400.
    """
