"""The README's "Development" section as a newcomer follows it on a fresh machine.

`honcho -f Procfile.dev -e config/dev.env start` must bring up a Redis of its own, the sandbox and
the production processes with ports that agree (whatever honcho's PORT), so the sandbox's delivery
reports reach the web process and every message gets its final status. And the install the two
commands do (scripts/bootstrap.sh) prints nothing of the tools' chatter unless a step fails.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from tests.e2e.test_procfile import VENV_BIN, _descendants, _kill, _running, honcho
from tests.support.sandbox import SandboxAdmin
from worker.devtools.devstack import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
README_COMMAND = "honcho -f Procfile.dev -e config/dev.env start"
REPORT_TYPES = {"delivered", "undeliverable", "expired", "rejected"}
MESSAGES = 20


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _with_port(url: str, port: int) -> str:
    replaced, n = re.subn(r"^(\w+://127\.0\.0\.1:)\d+", rf"\g<1>{port}", url)
    assert n == 1, f"{url!r} is not a loopback URL with a port"
    return replaced


def test_dev_env_uses_a_redis_of_its_own_on_loopback() -> None:
    """config/dev.env never points at the machine's shared Redis (6379) and only ever at 127.0.0.1."""
    dev = _env_file(ROOT / "config" / "dev.env")
    assert README_COMMAND in (ROOT / "README.md").read_text()
    assert re.match(r"^redis://127\.0\.0\.1:\d+/\d+$", dev["REDIS_URL"]), dev["REDIS_URL"]
    assert ":6379/" not in dev["REDIS_URL"]
    for name in ("ICOMM_BASE_URL", "SMS_WEBHOOK_PUBLIC_URL"):
        assert re.match(r"^http://127\.0\.0\.1:\d+$", dev[name]), (name, dev[name])
    assert re.search(r"^redis:.*redis-server", (ROOT / "Procfile.dev").read_text(), re.M)


def test_readme_stands_alone() -> None:
    """Every link in the README leads to a file of this repository (or the web): none outside it,
    which is broken on GitHub and for anyone who cloned only this repository."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert targets
    for target in targets:
        if re.match(r"^[a-z]+://", target) or target.startswith("#"):
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README links to {target}, not in the repository"


def _final(client: Any) -> dict[str, str]:
    last: dict[str, str] = {}
    for _, fields in client.xrange("sms:events"):
        event = orjson.loads(fields[b"event"])
        if event["type"] in REPORT_TYPES and event.get("reason") != "no_report":
            last[event["message_id"]] = event["type"]
    return last


def test_readme_development_command_delivers_reports(tmp_path: Path) -> None:
    """The README's command, from the repository root, with honcho's default PORT: 20 SMS enqueued with
    `sms-worker enqueue` each get a final delivery report, pushed by the sandbox to the web process.

    The only addition to the README's command is a second env file moving the three ports to free
    ones (the developer's own dev stack may hold dev.env's ports while the tests run): the processes
    still take them from the same variables, so a mismatch between them shows here as lost reports."""
    dev = _env_file(ROOT / "config" / "dev.env")
    ports = {name: _with_port(dev[name], free_port())
             for name in ("REDIS_URL", "ICOMM_BASE_URL", "SMS_WEBHOOK_PUBLIC_URL")}
    ports_file = tmp_path / "ports.env"
    ports_file.write_text("".join(f"{name}={value}\n" for name, value in ports.items()))
    env_files = ["config/dev.env", str(ports_file)]
    env = {k: v for k, v in os.environ.items() if k != "PORT"}  # honcho's own default, as on a fresh shell
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"

    def sms_worker(*args: str) -> str:
        """`honcho -e config/dev.env run sms-worker ...`, as the README says to poke at the stack."""
        done = subprocess.run([str(VENV_BIN / "honcho"), "-e", ",".join(env_files), "run", "sms-worker", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    people = tmp_path / "people.csv"
    with people.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["to", "name"])
        writer.writerows([f"4179{i:07d}", f"dev {i}"] for i in range(MESSAGES))

    log_path = tmp_path / "honcho.log"
    client = redis.Redis.from_url(ports["REDIS_URL"], socket_connect_timeout=0.5)
    processes: set[int] = set()
    try:
        with log_path.open("wb") as log, honcho(env, log, "Procfile.dev", env_files) as proc:

            def up() -> bool:
                assert proc.poll() is None, "honcho stopped: a process of Procfile.dev exited"
                processes.update(_descendants(proc.pid))
                try:
                    client.ping()
                    return (httpx.get(f"{ports['ICOMM_BASE_URL']}/_sandbox/stats", timeout=1).status_code == 200
                            and httpx.get(f"{ports['SMS_WEBHOOK_PUBLIC_URL']}/readyz", timeout=1).status_code == 200)
                except (redis.ConnectionError, httpx.HTTPError):
                    return False

            wait_until(up, 20, "Procfile.dev's Redis, sandbox and web process", interval_s=0.2)
            assert f"queued {MESSAGES}" in sms_worker("enqueue", "--csv", str(people),
                                                      "--text-template", "Hello {name}")
            wait_until(lambda: len(_final(client)) >= MESSAGES, 25, f"{MESSAGES} final delivery reports",
                       interval_s=0.2)
            status = sms_worker("status")
            with SandboxAdmin(ports["ICOMM_BASE_URL"]) as sandbox:
                stats = sandbox.stats()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
    except BaseException:
        print(log_path.read_text(errors="replace")[-8000:] if log_path.exists() else "(no honcho log)")
        raise
    finally:
        client.close()
        _kill({p for p in processes if _running(p)})
    assert _pushed(stats) == {"ok": True}
    assert re.search(r"accepted, awaiting a final report:\s+0\b", status), status
    assert stats["messages_accepted"] == MESSAGES and stats["duplicates"] == 0


def _pushed(stats: dict[str, Any]) -> dict[str, Any]:
    """'ok' when every report was pushed to the web process and none failed; else what went wrong."""
    webhooks, reports = stats["webhooks"], stats["reports"]
    if webhooks["failures"] == 0 and webhooks["dropped"] == 0 and reports["pushed"] == MESSAGES:
        return {"ok": True}
    return {"webhooks": webhooks, "reports": reports}


# --- scripts/bootstrap.sh: quiet unless a step fails ----------------------------------------------------
NOISE = "chatter-line-from-the-tool"
TOOLS = ("bash", "sh", "cat", "cp", "cut", "rm", "touch", "mkdir", "mktemp", "sha256sum", "dirname", "env", "chmod",
         "printf", "tail", "head", "sed", "grep")


def _fake_machine(tmp_path: Path, *, pip_fails: bool = False, apt_fails: bool = False) -> tuple[Path, dict[str, str]]:
    """A copy of scripts/bootstrap.sh in an empty project, on a PATH of the basic tools plus fakes that
    print chatter on stdout and stderr and fail on demand: `python3` (its venv's python runs pip),
    `apt-get` (installs a fake redis-server) and `id` (says root). No redis-server on that PATH to
    begin with, and nothing here reaches a network or changes the machine."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "scripts" / "bootstrap.sh").write_text((ROOT / "scripts" / "bootstrap.sh").read_text())
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found.startswith("/"):
            (bin_dir / tool).symlink_to(found)

    def script(path: Path, body: str) -> None:
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    script(tmp_path / "venv-python", f'echo "{NOISE} pip $*"; echo "{NOISE} pip warning" >&2; exit {int(pip_fails)}\n')
    script(bin_dir / "python3", (
        'if [ "$1 $2" = "-m venv" ]; then\n'
        f'  echo "{NOISE} venv"; mkdir -p "$3/bin"; cp "{tmp_path}/venv-python" "$3/bin/python"; exit 0\n'
        "fi\nexit 2\n"))
    script(bin_dir / "apt-get", (
        f'echo "{NOISE} apt-get $*"; echo "{NOISE} apt-get stderr" >&2\n'
        f'[ "$1" = install ] && {{ printf "#!/bin/bash\\n" > "{bin_dir}/redis-server"; '
        f'chmod +x "{bin_dir}/redis-server"; }}\n'
        f"exit {int(apt_fails)}\n"))
    script(bin_dir / "id", 'if [ "$1" = "-u" ]; then echo 0; else exit 1; fi\n')
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": "python3", "TMPDIR": str(tmp_path)}
    return project, env


def _bootstrap(project: Path, env: dict[str, str], steps: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(env["PATH"]) / "bash"), "-c", f'source scripts/bootstrap.sh; {steps}'],
                          cwd=project, env=env, capture_output=True, text=True, timeout=60)


def test_bootstrap_install_is_quiet_when_it_works(tmp_path: Path) -> None:
    project, env = _fake_machine(tmp_path)
    done = _bootstrap(project, env, "ensure_venv; ensure_redis_binary")
    assert done.returncode == 0, done.stdout + done.stderr
    assert NOISE not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "==> installing icomm-sms-worker" in done.stderr  # what it does, in one line per step
    assert "==> installing Debian's redis-server" in done.stderr


def test_bootstrap_shows_the_output_of_a_failed_pip_install(tmp_path: Path) -> None:
    project, env = _fake_machine(tmp_path, pip_fails=True)
    done = _bootstrap(project, env, "ensure_venv")
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"{NOISE} pip" in out and f"{NOISE} pip warning" in out, out
    assert "error:" in out


def test_bootstrap_shows_the_output_of_a_failed_redis_install(tmp_path: Path) -> None:
    project, env = _fake_machine(tmp_path, apt_fails=True)
    done = _bootstrap(project, env, "ensure_redis_binary")
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"{NOISE} apt-get" in out and f"{NOISE} apt-get stderr" in out, out
    assert "error:" in out

