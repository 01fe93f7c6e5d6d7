"""Parse gin config files and command-line bindings into validated config objects.

Every config includes configs/base.gin, which defines the macros a user may override
(`--gin.STEPS=100`). A misspelt macro or binding, or a bad value, is a one-line ConfigError
naming the binding. A bare word that gin cannot read as a value is taken as a string, so a
path needs no gin quoting on the command line (`--gin.TRAIN_DATA=data/x`).
"""

from __future__ import annotations

import ast
import difflib
import inspect
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
_BARE_WORD = re.compile(r"^[^\s'\"@%()\[\]{},=]+$")  # no quotes, references or brackets
_VALUES = "a number, 'quoted string', (tuple), True, False, None, @name or %MACRO"


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
    gin_files: Sequence[str | Path], bindings: Sequence[str], allow_list: bool = False
) -> tuple[SAEConfig, TrainConfig]:
    """Parse files then `NAME=VALUE` bindings; return the (validated) model and train configs.
    A config that lists several SAEs (SAES, for launch.train_many) is refused unless
    `allow_list`."""
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
            _bind(binding)
        gin.finalize()
        if not allow_list:
            _refuse_list()
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


def listed_saes() -> list:
    """The SAES list of the config just parsed (launch.train_many's entries; [] for none, or
    for a config without base.gin)."""
    try:
        return list(gin.query_parameter("%SAES") or [])
    except ValueError:  # a config without base.gin
        return []


def _refuse_list() -> None:
    """A one-line ConfigError where the config lists SAEs for launch.train_many."""
    if saes := listed_saes():
        raise ConfigError(f"this config lists {len(saes)} SAEs (SAES): train them with python -m "
                          "launch.train_many, or one alone with --gin_file=DIR/<name>/config.gin "
                          "of its train_many run")  # fmt: skip


def _check_macro_binding(binding: str) -> None:
    """Reject `FOO=1` unless macro FOO is defined by the loaded config files (gin would accept
    a new, unused macro silently)."""
    if "=" not in binding:
        raise ConfigError(f"binding {binding!r} is not NAME=VALUE")
    name = binding.split("=", 1)[0].strip()
    if "." not in name:  # a macro, in any case: gin would bind `steps` as a new, unused one
        try:
            if not _MACRO.match(name):
                raise ValueError(name)
            gin.query_parameter(f"%{name}")
        except ValueError:
            raise ConfigError(f"unknown macro {name!r}{_did_you_mean(name.upper(), macros())}"
                              "; python -m launch.train --help lists them") from None  # fmt: skip


def _bind(binding: str) -> None:
    """Parse one NAME=VALUE binding. A bare word gin cannot read (`data/x`) is bound as the
    string 'data/x' where NAME holds a string. Errors name the binding."""
    name, value = (part.strip() for part in binding.split("=", 1))
    try:
        gin.parse_config(binding)
    except Exception as e:  # gin's parser raises ValueError, SyntaxError, TokenError...
        if _BARE_WORD.match(value) and _holds_string(name):
            gin.parse_config(f"{name} = {value!r}")
        elif _is_value(value):
            why = _one_line(e).rstrip(".")
            raise ConfigError(f"--gin.{binding}: {why}{_closest_binding(name)}") from None
        else:
            raise ConfigError(f"--gin.{binding}: {value} is not a value; write {_VALUES}"
                              f"{_closest_binding(name)}") from None  # fmt: skip


def _is_value(text: str) -> bool:
    """Whether `text` is a Python literal or a gin reference (what gin can bind)."""
    if text[:1] in ("@", "%"):
        return True
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return True


def _holds_string(name: str) -> bool:
    """Whether the macro or parameter `name` is bound to, or defaults to, a string."""
    try:
        if isinstance(gin.query_parameter(name if "." in name else f"%{name}"), str):
            return True
    except ValueError:
        pass  # a parameter that no config file binds
    configurable, _, param = name.rpartition(".")
    try:
        target = gin.get_configurable(configurable.rpartition("/")[2])
        default = inspect.signature(target).parameters[param].default
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(default, str)


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    """' (did you mean X?)' for the known name closest to a misspelt one, else ''."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _closest_binding(name: str) -> str:
    """For `Class.param` naming no configurable or parameter: ' (did you mean Class.other?)'
    (else '')."""
    configurable, _, param = name.rpartition(".")
    if not configurable:
        return ""
    scope, _, cls = configurable.rpartition("/")
    prefix = f"{scope}/" if scope else ""
    try:
        target = gin.get_configurable(cls)
    except ValueError:  # no such configurable
        try:  # gin keeps no public list of the registered names
            known = {selector.rpartition(".")[2] for selector, _ in gin.config._REGISTRY.items()}
        except AttributeError:
            return ""
        close = difflib.get_close_matches(cls, sorted(known), n=1)
        return f" (did you mean {prefix}{close[0]}.{param}?)" if close else ""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return ""
    if param in params:
        return ""
    close = difflib.get_close_matches(param, params, n=1)
    return f" (did you mean {configurable}.{close[0]}?)" if close else ""


def macros() -> list[str]:
    """Macro names defined in configs/base.gin."""
    text = (CONFIG_DIR / "base.gin").read_text()
    return re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", text, flags=re.M)


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
