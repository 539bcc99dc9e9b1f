"""Where `esd` finds the gateway, the API key and the user.

`esd login` writes them into a JSON file that only its owner may read or write (mode 0600, in a
0700 folder): `$ESD_CONFIG`, else `$XDG_CONFIG_HOME/esd/config.json`, else
`~/.config/esd/config.json`. The environment overrides the file field by field: `ESD_URL`,
`ESD_API_KEY`, `ESD_USER`, `ESD_TOKEN` (a bearer token from `POST /tokens`, which a server in
the token auth mode requires; `esd login --password` gets one)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8080"
ENVIRONMENT = {"url": "ESD_URL", "api_key": "ESD_API_KEY", "user": "ESD_USER", "token": "ESD_TOKEN"}


class ConfigError(Exception):
    """The configuration is missing or unusable; the message says what to do."""


@dataclass(frozen=True)
class Config:
    url: str = DEFAULT_URL
    api_key: str = ""
    user: str = ""
    token: str = ""

    def with_environment(self, env: Mapping[str, str]) -> Config:
        """The file's values, each replaced by its environment variable when that is set."""
        overrides = {field: env[name] for field, name in ENVIRONMENT.items() if env.get(name)}
        return replace(self, **overrides)

    def checked(self) -> Config:
        """Itself, when it names a key and a user (or holds a token, which names its user)."""
        missing = [ENVIRONMENT[field] for field in ("api_key", "user") if not getattr(self, field)]
        if self.token and missing == [ENVIRONMENT["user"]]:
            return self
        if missing:
            raise ConfigError(f"not signed in: run `esd login` (or set {' and '.join(missing)})")
        return self


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("ESD_CONFIG"):
        return Path(env["ESD_CONFIG"]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "esd" / "config.json"


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """The file's configuration (defaults when there is none) under the environment's."""
    env = os.environ if env is None else env
    stored = Config()
    if path.exists():
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            # it holds a credential: refuse to go on using one others could read
            raise ConfigError(f"{path} may be read by others: run `chmod 600 {path}`")
        try:
            values = json.loads(path.read_text())
        except ValueError as error:
            raise ConfigError(f"{path} is not valid JSON ({error}): run `esd login` again") from None
        known = {key: str(value) for key, value in values.items() if key in ENVIRONMENT}
        stored = Config(**known)
    return stored.with_environment(env)


def save(path: Path, config: Config) -> None:
    """Writes the file readable and writable by its owner only, from its first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(descriptor, "w") as file:
        json.dump(asdict(config), file, indent=2)
        file.write("\n")
