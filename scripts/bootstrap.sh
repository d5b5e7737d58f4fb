# Sourced by scripts/test and scripts/demo: make a fresh machine ready to run the project.
# - a virtual environment in .venv with the package and its dev extras (reinstalled when
#   pyproject.toml changes), and
# - a redis-server binary (Debian's package, installed when missing and we are root).

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

say() { printf '%s\n' "$*" >&2; }

ensure_venv() {
  if ! command -v "$PY" >/dev/null 2>&1; then
    say "error: $PY not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)"
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "==> creating virtual environment in .venv"
    "$PY" -m venv "$VENV" || {
      say "error: could not create a venv (Debian: apt-get install python3-venv)"; exit 1; }
  fi
  local stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    say "==> installing icomm-sms-worker with its dev extras into .venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
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
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    # The package may start a system service on 6379; we never use it, our runs start their own.
  else
    say "error: redis-server is not installed. Install it (Debian: sudo apt-get install redis-server)"
    say "       or run this script as root so it can install it."
    exit 1
  fi
}
