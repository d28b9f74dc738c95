"""Where the box's URL and API key come from: arguments, then ``AIBOX_URL`` and
``AIBOX_API_KEY``, then the config file ``aibox login`` writes
(``$AIBOX_CONFIG``, else ``$XDG_CONFIG_HOME/aibox/config.toml``, else
``~/.config/aibox/config.toml``), which must be readable by its owner alone."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from aibox_client.errors import AIBoxError


class ConfigError(AIBoxError):
    """No credentials, an unsafe config file, or one that cannot be read."""


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str
    source: str  # where they came from, for messages


def config_path() -> Path:
    if os.environ.get("AIBOX_CONFIG"):
        return Path(os.environ["AIBOX_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "aibox" / "config.toml"


def read_config(path: Path | None = None) -> dict[str, str]:
    """The config file's values, or {} when there is none. Refuses a file that group or
    others may read or write: it holds an API key."""
    path = path or config_path()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"Refusing to read {path}: it holds an API key and its mode is "
            f"{stat.S_IMODE(mode):04o}, so other users may read it. Run 'chmod 600 {path}' "
            "(and consider revoking the key if others could have read it)."
        )
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from exc
    return {k: str(v) for k, v in data.items() if k in ("url", "api_key")}


def write_config(url: str, api_key: str, path: Path | None = None) -> Path:
    """Write the config file with mode 0600 (its folder 0700), replacing any earlier one."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # TOML basic strings escape as JSON's do (\uXXXX included).
    text = f"url = {json.dumps(url)}\napi_key = {json.dumps(api_key)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        file.write(text)
    return path


def resolve_credentials(url: str | None = None, api_key: str | None = None) -> Credentials:
    """The URL and key to use: given ones first, then the environment, then the file."""
    sources = []
    url = url or os.environ.get("AIBOX_URL") or None
    api_key = api_key or os.environ.get("AIBOX_API_KEY") or None
    if url is None or api_key is None:
        stored = read_config()
        if stored:
            sources.append(str(config_path()))
        url = url or stored.get("url")
        api_key = api_key or stored.get("api_key")
    missing = [
        name for name, value in (("AIBOX_URL", url), ("AIBOX_API_KEY", api_key)) if not value
    ]
    if missing:
        raise ConfigError(
            f"No {' or '.join(missing)}: set {' and '.join(missing)} in the environment, "
            f"pass --url/--api-key, or run 'aibox login' (writes {config_path()})."
        )
    return Credentials(url=url, api_key=api_key, source=", ".join(sources) or "environment")
