"""Settings helpers: load or fail naming the variable, secrets from files, redaction."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsError

from shared.logs import Redactor

EX_CONFIG = 78  # sysexits.h; systemd units use RestartPreventExitStatus=78

S = TypeVar("S", bound=BaseSettings)


class ConfigError(Exception):
    """Invalid configuration; the message names the variable and what is wrong."""


def load(cls: type[S]) -> S:
    """Build settings from the environment; raise ConfigError naming the variable."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    try:
        return cls()
    except ValidationError as exc:
        raise ConfigError(_describe_validation(exc, prefix)) from None
    except SettingsError as exc:
        match = re.search(r'field "(\w+)"', str(exc))
        name = f"{prefix}{match.group(1)}".upper() if match else prefix + "*"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigError(f"{name}: could not parse value (expected JSON){cause}") from None


def load_or_exit(cls: type[S], prog: str) -> S:
    """``load`` for an entry point: on invalid configuration, say which variable is wrong
    and exit 78 (EX_CONFIG), which systemd's RestartPreventExitStatus=78 does not retry."""
    try:
        return load(cls)
    except ConfigError as exc:
        print(f"{prog}: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def _describe_validation(exc: ValidationError, prefix: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        var = f"{prefix}{loc[0]}".upper() if loc else prefix + "*"
        where = f" (at {'.'.join(loc[1:])})" if len(loc) > 1 else ""
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required but not set"
        lines.append(f"{var}{where}: {msg}" if loc else msg.removeprefix("Value error, "))
    return "; ".join(lines)


def read_secret(value: SecretStr | None, file: Path | None, credential: str) -> SecretStr | None:
    """A secret from the variable, its ``*_FILE`` variant, or a systemd credential."""
    if value is not None:
        return value
    if file is not None:
        return SecretStr(file.read_text().strip())
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        return SecretStr((Path(cred_dir) / credential).read_text().strip())
    return None


def secret_from_file(data: Any, name: str, credential: str, prefix: str) -> Any:
    """A ``mode="before"`` validator's step for the secret field ``name``: when its variable
    is unset, fill it from ``{name}_file`` or the systemd credential ``credential``. A file
    that cannot be read is a ValueError naming the ``*_FILE`` variable (exit 78)."""
    if not isinstance(data, dict) or data.get(name):
        return data
    path = data.get(f"{name}_file")
    try:
        secret = read_secret(None, Path(str(path)) if path else None, credential)
    except (OSError, UnicodeDecodeError) as exc:
        variable = f"{prefix}{name}_FILE".upper() if path else f"credential {credential!r}"
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"{variable}: cannot read {path or credential}: {reason}") from None
    return data if secret is None else {**data, name: secret}


def redacted(settings: BaseSettings) -> dict[str, Any]:
    """The effective configuration for check-config output: SecretStr dumps as ``*****``,
    passwords inside URLs (camera URLs are plain strings) are masked too."""
    doc: dict[str, Any] = Redactor(secret_values(settings)).walk(settings.model_dump(mode="json"))
    return doc


def secret_values(model: BaseModel) -> list[str]:
    """Every secret a settings object holds (nested models and mappings included), plus
    the password inside a secret URL, for the log redaction processor."""
    found: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            found.append(secret)
            password = urlsplit(secret).password if "://" in secret else None
            if password:
                found.extend(dict.fromkeys((password, unquote(password))))  # stable order
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                visit(getattr(value, name))
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    visit(model)
    return found
