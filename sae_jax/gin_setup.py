"""Parse gin config files and command-line bindings into validated config objects.

Every config includes configs/base.gin, which defines the macros a user may override
(`--gin.STEPS=100`). A misspelt macro or binding, or a bad value, is a one-line ConfigError.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import gin

import sae_jax.data  # noqa: F401  (registers SyntheticData with gin)
from sae_jax.config import ConfigError, SAEConfig, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.gin"
_MACRO = re.compile(r"^[A-Z][A-Z0-9_]*$")


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or else relative to the bundled configs/ directory."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / path.name):
        if candidate.exists():
            return candidate
    raise ConfigError(f"config file not found: {name}")


def parse(
    gin_files: Sequence[str | Path], bindings: Sequence[str]
) -> tuple[SAEConfig, TrainConfig]:
    """Parse files then `NAME=VALUE` bindings; return the (validated) model and train configs."""
    gin.clear_config()
    gin.add_config_file_search_path(str(CONFIG_DIR))
    files = [str(resolve_config_path(f)) for f in gin_files or [DEFAULT_CONFIG]]
    # gin's package-resource reader logs an error for every include it resolves through the
    # search path before finding it there; silence that while parsing.
    logging.disable(logging.ERROR)
    try:
        gin.parse_config_files_and_bindings(files, None, finalize_config=False)
        for binding in bindings:
            _check_macro_binding(binding)
        gin.parse_config_files_and_bindings(None, list(bindings))
        sae_cfg, train_cfg = SAEConfig(), TrainConfig()
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, SyntaxError, OSError, RuntimeError) as e:
        raise ConfigError(_one_line(e)) from None
    finally:
        logging.disable(logging.NOTSET)
    sae_cfg.validate(need_d=False)
    train_cfg.validate()
    return sae_cfg, train_cfg


def _check_macro_binding(binding: str) -> None:
    """Reject `FOO=1` unless macro FOO is defined by the loaded config files (gin would accept
    a new, unused macro silently)."""
    if "=" not in binding:
        raise ConfigError(f"binding {binding!r} is not NAME=VALUE")
    name = binding.split("=", 1)[0].strip()
    if _MACRO.match(name):
        try:
            gin.query_parameter(f"%{name}")
        except ValueError:
            raise ConfigError(f"unknown macro {name!r}; known: {', '.join(macros())}") from None


def macros() -> list[str]:
    """Macro names defined in configs/base.gin."""
    text = (CONFIG_DIR / "base.gin").read_text()
    return re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", text, flags=re.M)


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
