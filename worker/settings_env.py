"""Where settings come from besides the process's environment: the env file, and variables that are no setting.

`env_file_path` finds the env file (SMS_ENV_FILE's, else `.env` here), `read_env_file` reads it
with one clear line for a file that cannot be read, and `unknown_variables` lists the SMS_*/ICOMM_*
variables (and, in the env file, near misses of the unprefixed settings) that are no setting, so a
misspelt one is not ignored silently. worker.settings re-exports what its callers use.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ConfigError

# The env file: SMS_ENV_FILE names it (`sms-worker --env-file` sets it, so the processes a command
# starts read the same file); otherwise `.env` in the working directory, when there is one.
ENV_FILE_VARIABLE = "SMS_ENV_FILE"
DEFAULT_ENV_FILE = ".env"
# SMS_*/ICOMM_* variables this project uses that are not settings (no warning for these):
NOT_SETTINGS = frozenset({
    ENV_FILE_VARIABLE,  # the env file to read, above
    "SMS_WORKER_IMAGE",  # deploy/compose.yaml: the image docker compose runs
    "SMS_RELIABILITY",  # scripts/reliability and tests/reliability: the suites' size ...
})
NOT_SETTINGS_PREFIXES = ("SMS_RELIABILITY_",)  # ... and the harness's knobs (_TRIALS, _SEED, _ENV, ...)
OUR_PREFIXES = ("SMS_", "ICOMM_")


def env_file_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The env file the settings are read from: SMS_ENV_FILE's, else `.env` here when it exists."""
    environ = os.environ if environ is None else environ
    named = environ.get(ENV_FILE_VARIABLE)
    if named:
        path = Path(named)
        if not path.exists():
            raise ConfigError(f"{ENV_FILE_VARIABLE}={named}: no such file")
        if not path.is_file():
            raise ConfigError(f"{ENV_FILE_VARIABLE}={named}: not a file")
        return path
    default = Path(DEFAULT_ENV_FILE)
    return default if default.is_file() else None


def read_env_file(path: Path) -> dict[str, str | None]:
    from dotenv import dotenv_values  # python-dotenv, pydantic-settings' own reader

    try:
        return dict(dotenv_values(path, encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None


@dataclass(frozen=True)
class UnknownVariable:
    """A variable that looks meant for this worker but is no setting, so it is ignored."""

    name: str
    source: str  # "the environment" or the env file's path
    closest: str | None  # the setting it is most likely a misspelling of

    def line(self) -> str:
        hint = f"did you mean {self.closest}?" if self.closest else "the settings are listed in config/example.env"
        return f"{self.name} (in {self.source}) is not a setting and is ignored; {hint}"


def _unknown(
    name: str, source: str, setting_names: Sequence[str], *, near_misses_too: bool
) -> UnknownVariable | None:
    upper = name.upper()
    if upper in setting_names or upper in NOT_SETTINGS or upper.startswith(NOT_SETTINGS_PREFIXES):
        return None
    if upper.startswith(OUR_PREFIXES):
        close = difflib.get_close_matches(upper, setting_names, n=1, cutoff=0.6)
        return UnknownVariable(name, source, close[0] if close else None)
    if near_misses_too:  # REDIS_ULR in the env file: ours, misspelt
        unprefixed = [setting for setting in setting_names if not setting.startswith(OUR_PREFIXES)]
        close = difflib.get_close_matches(upper, unprefixed, n=1, cutoff=0.8)
        if close:
            return UnknownVariable(name, source, close[0])
    return None


def unknown_variables(setting_names: Sequence[str], environ: Mapping[str, str] | None = None) -> list[UnknownVariable]:
    """Every SMS_*/ICOMM_* variable of the environment and the env file that is not one of
    `setting_names` (and, in the env file, a near miss of REDIS_URL or LOG_*), with the setting it
    most likely meant."""
    environ = os.environ if environ is None else environ
    found = [u for name in environ if (u := _unknown(name, "the environment", setting_names, near_misses_too=False))]
    try:
        env_file = env_file_path(environ)
        names = list(read_env_file(env_file)) if env_file is not None else []
    except ConfigError:  # load_settings says so, as an error
        return found
    return found + [
        u for name in names if (u := _unknown(name, str(env_file), setting_names, near_misses_too=True))
    ]
