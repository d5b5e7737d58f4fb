"""worker.provider over real loopback sockets: the send fence at the socket, and pool healing.

`WireServer` is a tiny HTTP/1.1 server that records exactly what arrives on every connection (every
byte, which requests came complete with their whole Content-Length body, which connections ended
mid-request), so a test can say "the server received nothing" and mean it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

import worker.provider.client as provider_module
from worker.errors import ProviderNotActedOn, SendWindowClosed
from worker.models import Job, encode_job
from worker.provider import FENCE_WRITE_GRACE_S, Provider, ProviderConfig, wire_message_from_dict, wire_request
from worker.settings import Settings

API_KEY = "socket-test-key-0123"
PHONE = "41793026727"
PENDING = {"groupId": 1, "groupName": "PENDING", "id": 26, "name": "PENDING_ACCEPTED", "description": "ok"}

# An answer: the bytes to write back, or None to never answer (the connection stalls until the
# client gives up and closes it).
Answer = Callable[["Received"], bytes | None]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass
class Connection:
    """One TCP connection as the server saw it."""

    number: int
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Received] = field(default_factory=list)
    incomplete: bytes | None = None  # what it got of a request that never completed
    closed: bool = False


def http_reply(body: object, status: int = 200, *, close: bool = False) -> bytes:
    content = orjson.dumps(body)
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(content)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + content


def accepted_reply(received: Received) -> bytes:
    ids = [d["messageId"] for m in orjson.loads(received.body)["messages"] for d in m["destinations"]]
    return http_reply({"bulkId": "B-1", "messages": [{"messageId": i, "status": PENDING} for i in ids]})


class WireServer:
    def __init__(self, answer: Answer = accepted_reply) -> None:
        self.answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[Connection] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._changed = threading.Condition()
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept, name="wire-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[Received]:
        with self._changed:
            return [r for c in self.connections for r in c.requests]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until the server's record satisfies `predicate` (re-checked on every change)."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def closed(self, number: int) -> bool:
        """Whether connection `number` (1-based) was accepted and has ended."""
        return len(self.connections) >= number and self.connections[number - 1].closed

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            sockets = list(self._sockets)
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes recv()
        self._acceptor.join(10)
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._changed:
                if self._stopping:
                    sock.close()
                    return
                connection = Connection(len(self.connections) + 1)
                self.connections.append(connection)
                self._sockets.append(sock)
                thread = threading.Thread(target=self._serve, args=(sock, connection), daemon=True)
                self._threads.append(thread)
                self._changed.notify_all()
            thread.start()

    def _recv(self, sock: socket.socket, connection: Connection) -> bytes:
        data = sock.recv(65536)
        with self._changed:
            connection.raw += data
            self._changed.notify_all()
        return data

    def _serve(self, sock: socket.socket, connection: Connection) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = self._recv(sock, connection)
                    if not data:
                        if buffer:
                            self._incomplete(connection, buffer)
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                line, *fields = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    data = self._recv(sock, connection)
                    if not data:
                        self._incomplete(connection, head + b"\r\n\r\n" + buffer)
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                received = Received(method, target.split("?", 1)[0], headers, body, connection.number)
                with self._changed:
                    connection.requests.append(received)
                    self._changed.notify_all()
                reply = self.answer(received)
                if reply is None:
                    while self._recv(sock, connection):
                        pass
                    return
                sock.sendall(reply)
                if b"Connection: close" in reply.split(b"\r\n\r\n", 1)[0]:
                    return
        except OSError:
            return
        finally:
            sock.close()
            with self._changed:
                connection.closed = True
                self._changed.notify_all()

    def _incomplete(self, connection: Connection, got: bytes) -> None:
        with self._changed:
            connection.incomplete = got
            self._changed.notify_all()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def servers() -> Iterator[Callable[..., WireServer]]:
    started: list[WireServer] = []

    def start(answer: Answer = accepted_reply) -> WireServer:
        server = WireServer(answer)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def providers() -> Iterator[Callable[..., Provider]]:
    made: list[Provider] = []

    def make(server: WireServer, **overrides: Any) -> Provider:
        values: dict[str, Any] = {
            "icomm_base_url": server.url,
            "icomm_api_key": API_KEY,
            "icomm_send_retry_attempts": 2,
            "icomm_retry_backoff_base_s": 0.01,
            "icomm_retry_backoff_max_s": 0.05,
            "icomm_connect_timeout_s": 2.0,
            "icomm_read_timeout_s": 5.0,
            "icomm_write_timeout_s": 2.0,
            "icomm_pool_timeout_s": 2.0,
            "icomm_max_connections": 4,
            "sms_lease_s": 600.0,
        }
        values.update(overrides)
        provider = Provider(ProviderConfig.from_settings(Settings(**values)), sleep=lambda s: None)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def _reports_held_until(release: threading.Event) -> Callable[[Received], bytes]:
    """Sends are accepted at once; a reports GET holds its connection until `release` is set."""

    def answer(received: Received) -> bytes:
        if received.path == "/sms/3/reports":
            assert release.wait(10)
            return http_reply({"results": []})
        return accepted_reply(received)

    return answer


def one_request(message_id: str = "sw-1") -> Any:
    job = Job.model_validate({"to": "+" + PHONE, "text": "Hello"})
    stored = orjson.loads(encode_job(job))
    return wire_request([wire_message_from_dict(stored, message_id, default_sender=None, webhook_url=None)])


def resets(reason: str) -> float:
    return REGISTRY.get_sample_value("sms_provider_pool_resets_total", {"reason": reason}) or 0.0


# --- the send fence at the socket -----------------------------------------------------------------


def test_closed_fence_writes_no_byte_and_the_pool_keeps_working(
    servers: Callable[..., WireServer], providers: Callable[..., Provider]
) -> None:
    """Fence False on a fresh connection: the TCP connection was made (the fence runs after the
    connect), not one byte arrived, the client closed it; the next send works on a new connection."""
    server = servers()
    provider = providers(server)
    asked: list[int] = []

    def fence() -> bool:
        # Called after the connect: the server has the TCP connection already, with nothing on it.
        assert server.wait_for(lambda: len(server.connections) == 1)
        asked.append(len(server.connections[0].raw))
        return False

    with pytest.raises(SendWindowClosed, match="nothing was written"):
        provider.send(one_request(), fence=fence)
    assert asked == [0]
    assert server.wait_for(lambda: server.closed(1))
    first = server.connections[0]
    assert (bytes(first.raw), first.requests, first.incomplete) == (b"", [], None)

    assert provider.send(one_request("sw-2"), fence=lambda: True).messages[0].message_id == "sw-2"
    assert [(r.connection, r.path) for r in server.requests] == [(2, "/sms/3/messages")]


def test_closed_fence_on_a_reused_connection_closes_it_cleanly(
    servers: Callable[..., WireServer], providers: Callable[..., Provider]
) -> None:
    """Fence False on a keep-alive connection: it carried exactly the previous request and nothing
    more, it is closed rather than reused, and the pool opens a new one for the next send."""
    server = servers()
    provider = providers(server)
    provider.send(one_request("sw-1"))
    with pytest.raises(SendWindowClosed):
        provider.send(one_request("sw-2"), fence=lambda: False)
    assert server.wait_for(lambda: server.closed(1))
    provider.send(one_request("sw-3"), fence=lambda: True)
    first = server.connections[0]
    assert [orjson.loads(r.body)["messages"][0]["destinations"][0]["messageId"] for r in server.requests] == [
        "sw-1", "sw-3",
    ]
    assert [r.connection for r in server.requests] == [1, 2]
    assert first.incomplete is None
    assert bytes(first.raw).count(b"POST ") == 1  # the aborted attempt added nothing to it


def test_fence_is_asked_only_after_the_pool_wait(
    servers: Callable[..., WireServer], providers: Callable[..., Provider]
) -> None:
    """With one connection busy, a queued send's fence is not asked until the connection frees up:
    a deadline is checked at the last moment, not before a wait of up to the pool timeout."""
    release = threading.Event()
    server = servers(_reports_held_until(release))
    provider = providers(server, icomm_max_connections=1, icomm_pool_timeout_s=10.0)
    asked: list[int] = []

    def fence() -> bool:
        asked.append(len(server.requests))
        return True

    with ThreadPoolExecutor(max_workers=2) as pool:
        holder = pool.submit(provider.reports_raw)
        assert server.wait_for(lambda: len(server.requests) == 1)
        queued = pool.submit(provider.send, one_request(), fence=fence)
        deadline = time.monotonic() + 10
        while provider._generation.in_flight < 2 and time.monotonic() < deadline:
            threading.Event().wait(0.001)  # until the send is inside the pool wait
        assert provider._generation.in_flight == 2
        assert asked == []  # still waiting for the pool: not asked yet
        release.set()
        assert holder.result() == b'{"results":[]}'
        assert queued.result().messages[0].message_id == "sw-1"
    assert asked == [1]


def test_fence_is_asked_again_for_every_retry_over_the_wire(
    servers: Callable[..., WireServer], providers: Callable[..., Provider]
) -> None:
    """A 503 then a 200: two requests arrive, the fence was asked at each attempt and before the
    retry (3 calls), each time with everything before it already answered."""
    answers = iter([http_reply({"errorCode": "E503", "description": "later"}, 503)])

    def answer(received: Received) -> bytes:
        return next(answers, None) or accepted_reply(received)

    server = servers(answer)
    provider = providers(server)
    asked: list[int] = []

    def fence() -> bool:
        asked.append(len(server.requests))
        return True

    provider.send(one_request(), fence=fence)
    assert asked == [0, 1, 1]
    assert len(server.requests) == 2


def test_pause_between_headers_and_body_leaves_an_incomplete_request(
    servers: Callable[..., WireServer], providers: Callable[..., Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fence said yes, then the process 'paused' (the clock jumps past FENCE_WRITE_GRACE_S) after
    the headers went out: the body is not written, the server holds headers announcing a body that
    never came (no request to process), and the next send works on a new connection."""
    now = [100.0]
    monkeypatch.setattr(provider_module, "_now", lambda: now[0])
    server = servers()
    provider = providers(server)

    def fence_then_pause() -> bool:
        now[0] += FENCE_WRITE_GRACE_S + 0.5
        return True

    with pytest.raises(SendWindowClosed, match="headers were written, the body was not"):
        provider.send(one_request(), fence=fence_then_pause)
    assert server.wait_for(lambda: server.closed(1))
    first = server.connections[0]
    assert first.requests == []
    assert first.incomplete is not None
    head, _, body = first.incomplete.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /sms/3/messages HTTP/1.1")
    assert int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]) == len(orjson.dumps(one_request()))
    assert body == b""

    provider.send(one_request("sw-2"), fence=lambda: True)  # within the grace: sent whole
    assert [(r.connection, len(r.body) > 0) for r in server.requests] == [(2, True)]


# --- pool healing ---------------------------------------------------------------------------------


def _pool(client: httpx.Client) -> Any:
    return client._transport._pool  # type: ignore[attr-defined]


def _leaked(pool: Any) -> list[Any]:
    """Connections in the pool that never connected and that no request waits for or uses: the
    slots httpcore lost (they stay "CONNECTING" forever and count against max_connections)."""
    with pool._optional_thread_lock:
        owned = {id(r.connection) for r in pool._requests}
        return [c for c in pool._connections if c.info() == "CONNECTING" and id(c) not in owned]


def _leak_slots(client: httpx.Client, url: str, count: int) -> None:
    """Put the pool in the state the race leaves behind: connections created for a request that
    had already timed out, so nobody will ever connect or release them."""
    pool = _pool(client)
    origin = httpcore.URL(url).origin
    with pool._optional_thread_lock:
        for _ in range(count):
            pool._connections.append(pool.create_connection(origin))


def _stalls_some(every: int) -> Answer:
    """Answer most requests; leave every `every`-th one unanswered until the client gives up."""
    count = iter(range(1, 1 << 30))
    lock = threading.Lock()

    def answer(received: Received) -> bytes | None:
        with lock:
            n = next(count)
        return None if n % every == 0 else accepted_reply(received)

    return answer


STORM = {
    "icomm_max_connections": 2, "icomm_read_timeout_s": 0.1, "icomm_pool_timeout_s": 0.05,
    "icomm_connect_timeout_s": 0.5, "icomm_write_timeout_s": 0.5, "icomm_send_retry_attempts": 1,
}


def _storm(call: Callable[[], object], until: Callable[[], bool], budget_s: float = 30.0) -> dict[str, int]:
    """8 threads calling as fast as they can until `until()` or the time budget; outcome counts."""
    stop_at = time.monotonic() + budget_s
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def work() -> None:
        while time.monotonic() < stop_at and not until():
            try:
                call()
                outcome = "ok"
            except Exception as exc:  # noqa: BLE001 - counting outcomes, nothing else
                outcome = type(exc).__name__
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_provider_replaces_a_client_whose_slots_leaked(
    servers: Callable[..., WireServer], providers: Callable[..., Provider]
) -> None:
    """Every slot lost (as the race leaves it): the first attempt's PoolTimeout, with nobody holding
    a connection, replaces the client; the retry goes out on the new one. The field symptom (every
    call failing after 2 x the pool timeout) becomes one pool timeout, once."""
    server = servers()
    provider = providers(server, icomm_max_connections=2, icomm_pool_timeout_s=0.2)
    old = provider._generation.client
    _leak_slots(old, server.url, 2)
    before = resets("leaked_slots")
    with capture_logs() as logs:
        assert provider.send(one_request()).messages[0].message_id == "sw-1"
    reset = [e for e in logs if e["event"] == "provider_pool_reset"]
    assert [(e["log_level"], e["reason"], e["holding"], e["max_connections"]) for e in reset] == [
        ("warning", "leaked_slots", 0, 2),
    ]
    assert resets("leaked_slots") == before + 1
    assert old.is_closed  # its last request left: closed
    assert provider._generation.number == 2
    for n in range(5):
        provider.send(one_request(f"sw-{n}"))
    assert len(server.requests) == 6
    assert _leaked(_pool(provider._generation.client)) == []


def test_reset_never_closes_a_connection_under_a_request_in_flight(
    servers: Callable[..., WireServer], providers: Callable[..., Provider]
) -> None:
    """One slot lost, one held by a slow request: a queued send's PoolTimeout replaces the client
    and goes through on the new one while the slow request finishes normally on the old client,
    which is closed only once that request is done."""
    release = threading.Event()
    server = servers(_reports_held_until(release))
    provider = providers(server, icomm_max_connections=2, icomm_pool_timeout_s=0.2)
    old = provider._generation.client
    _leak_slots(old, server.url, 1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(provider.reports_raw)
        assert server.wait_for(lambda: len(server.requests) == 1)
        with capture_logs() as logs:
            provider.send(one_request())
        assert [(e["reason"], e["holding"]) for e in logs if e["event"] == "provider_pool_reset"] == [
            ("leaked_slots", 1),
        ]
        assert not old.is_closed  # the slow request still uses it
        release.set()
        assert slow.result() == b'{"results":[]}'
    assert old.is_closed
    assert [r.path for r in server.requests] == ["/sms/3/reports", "/sms/3/messages"]


def test_busy_pool_is_not_mistaken_for_a_broken_one(
    servers: Callable[..., WireServer], providers: Callable[..., Provider]
) -> None:
    """Every slot held by a real request: PoolTimeouts are plain back-pressure, no reset."""
    release = threading.Event()
    server = servers(_reports_held_until(release))
    provider = providers(server, icomm_max_connections=1, icomm_pool_timeout_s=0.05)
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(provider.reports_raw)
        assert server.wait_for(lambda: len(server.requests) == 1)
        with capture_logs() as logs:
            for _ in range(3):
                with pytest.raises(ProviderNotActedOn, match="PoolTimeout"):
                    provider.send(one_request())
        assert [e for e in logs if e["event"] == "provider_pool_reset"] == []
        release.set()
        slow.result()
    assert provider._generation.number == 1
    provider.send(one_request())
