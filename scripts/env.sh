# Sourced by the other scripts: create or reuse the project's virtual environment in .venv.
# Re-installs only when setup.cfg changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[env] creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-setup-cfg"
want="$(sha1sum "$ROOT/setup.cfg" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[env] installing the project and its pinned dependencies (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # opencv-contrib-python replaces opencv-python (one cv2 package, two distributions): an environment
  # made before the project switched still holds opencv-python, whose files would shadow contrib's.
  if "$VENV/bin/python" -m pip show -q opencv-python >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall -y -q opencv-python >&2
  fi
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" >&2
  if ! "$VENV/bin/python" -c "import cv2; cv2.optflow" >/dev/null 2>&1; then  # its files were half removed
    contrib="$(grep -o 'opencv-contrib-python==[0-9.]*' "$ROOT/setup.cfg")"
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$contrib" >&2
  fi
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
