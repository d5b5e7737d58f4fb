# Sourced by scripts/test and scripts/demo: make a fresh machine ready to run the project.
# - a virtual environment in .venv with the package and its dev extras (reinstalled when
#   pyproject.toml changes), and
# - a redis-server binary (Debian's package, installed when missing and we are root).
# Each step prints one line saying what it does; the tools' own output is kept in a temporary
# file and shown only when the step fails.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

say() { printf '%s\n' "$*" >&2; }

# quietly "what failed, and what to do" command...: run the command with its output captured;
# on failure print that output, then the message, and exit.
quietly() {
  local what="$1"; shift
  local out code=0
  out="$(mktemp "${TMPDIR:-/tmp}/sms-bootstrap.XXXXXX")"
  "$@" >"$out" 2>&1 || code=$?
  if [ "$code" != 0 ]; then
    say "--- output of: $* (exit $code)"
    cat "$out" >&2
    say "---"
    rm -f "$out"
    say "error: $what"
    exit 1
  fi
  rm -f "$out"
}

ensure_venv() {
  if ! command -v "$PY" >/dev/null 2>&1; then
    say "error: $PY not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)"
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "==> creating virtual environment in .venv"
    quietly "could not create a venv (Debian: apt-get install python3-venv)" "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    say "==> installing icomm-sms-worker with its dev extras into .venv"
    quietly "could not upgrade pip in .venv (the output above says why)" \
      "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip
    quietly "could not install the package into .venv (the output above says why)" \
      "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

ensure_redis_binary() {
  if command -v redis-server >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "==> installing Debian's redis-server package"
    export DEBIAN_FRONTEND=noninteractive
    quietly "apt-get update failed (the output above says why)" apt-get update
    quietly "could not install redis-server (the output above says why)" \
      apt-get install -y --no-install-recommends redis-server
    # The package may start a system service on 6379; we never use it, our runs start their own.
    if ! command -v redis-server >/dev/null 2>&1; then
      say "error: redis-server is still not on PATH after installing Debian's package"
      exit 1
    fi
  else
    say "error: redis-server is not installed. Install it (Debian: sudo apt-get install redis-server)"
    say "       or run this script as root so it can install it."
    exit 1
  fi
}
