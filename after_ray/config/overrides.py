"""Reading YAML from users, in one place: config files, sweep specs, dotted overrides, axes.

Every value a user types goes through ``yaml.safe_load`` here, and every way that can fail
(invalid YAML, not UTF-8, absurd nesting, an int of thousands of digits) becomes one
``ConfigError`` naming what was read: ``where`` is the phrase that opens the message
("override 'a.b=1'", "sweep axis 'run.seed'", "config file 'x.yaml'").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from after_ray.errors import ConfigError


def split_dotted(text: str, *, where: str, expected: str, bad_key: str) -> tuple[str, str]:
    """``"a.b=raw"`` -> ``("a.b", "raw")``; ``expected`` and ``bad_key`` say what a caller wants
    (``bad_key`` may use ``{key!r}``)."""
    if "=" not in text:
        raise ConfigError(f"{where}: {expected}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{where}: {bad_key.format(key=key)}")
    return key, raw


def parse_yaml_value(raw: str, *, where: str, what: str = "the value") -> Any:
    """One YAML value typed by a user (an empty string is None)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: {what} is not valid YAML ({exc})") from None
    except (RecursionError, ValueError) as exc:  # absurd nesting, an int of thousands of digits
        raise ConfigError(f"{where[:80]}...: {what} cannot be read ({exc})") from None


def read_yaml_file(path: str | Path, *, what: str, how_to_pass: str) -> Any:
    """The YAML document in ``path`` (None when empty); ``what`` names it ("config file"),
    ``how_to_pass`` says how to give another (``--config path/to/file.yaml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found (pass {how_to_pass})")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text") from None
    except (RecursionError, ValueError) as exc:  # absurd nesting, an int of thousands of digits
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc}") from None
