"""Loggers under 'pykernels', at the level PYKERNELS_LOG_LEVEL sets (configured on first use)."""

from __future__ import annotations

import logging

_configured = False


def get_logger(name: str) -> logging.Logger:
    """A logger named pykernels.<name>; the first call applies PYKERNELS_LOG_LEVEL."""
    global _configured
    if not _configured:
        _configured = True
        from pykernels import envs

        level = envs.PYKERNELS_LOG_LEVEL.upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"PYKERNELS_LOG_LEVEL={level!r} is not a log level "
                             "(DEBUG, INFO, WARNING, ERROR, CRITICAL)")
        root = logging.getLogger("pykernels")
        root.setLevel(level)
        if not root.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
            root.addHandler(handler)
    return logging.getLogger(f"pykernels.{name}")


def warn_once(logger: logging.Logger, key: str, msg: str, *args, _seen: set = set()) -> None:  # noqa: B006
    """Log msg at WARNING the first time key is seen in this process (fallbacks, misses)."""
    if key not in _seen:
        _seen.add(key)
        logger.warning(msg, *args)
