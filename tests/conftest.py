"""Shared fixtures: a private Redis for the whole session, flushed before each test that uses it."""

from __future__ import annotations

import atexit
import os
import tempfile
from collections.abc import Iterator

import pytest
import redis

from tests.support.redis_server import RedisServer
from worker.settings import ENV_FILE_VARIABLE, Settings
from worker.store import Store, connect

# Nor a developer's .env in the repository root, from the first import on (test modules load
# settings at import); the processes tests start inherit it. Tests of the env file itself unset it.
_fd, _NO_ENV_FILE = tempfile.mkstemp(prefix="sms-tests-", suffix=".env")  # empty
os.close(_fd)
atexit.register(os.unlink, _NO_ENV_FILE)
os.environ[ENV_FILE_VARIABLE] = _NO_ENV_FILE


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the environment: a variable set on this machine must not leak into tests."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        icomm_base_url="http://127.0.0.1:9",
        icomm_api_key="test-api-key-0123456789",
        log_format="console",
    )


@pytest.fixture
def store(redis_client: redis.Redis) -> Store:
    return Store(redis_client)
