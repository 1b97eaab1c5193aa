#!/usr/bin/env bash
# Create or update the project environment in .venv/ from the repository's own files.
#
# Idempotent and quick when nothing changed: a stamp in .venv records a hash of every
# input (pyproject.toml, requirements/, this script, the detectron2 installer), and the
# install runs again only when one of them differs.
#
# Environment:
#   PYTHON          interpreter used to create the venv (default: python3.11)
#   CVSERVE_EXTRAS  extras to install (default: dev,ray; the Docker image uses "ray")
#   CVSERVE_VENV    where the environment lives (default: <repo>/.venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CVSERVE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
EXTRAS="${CVSERVE_EXTRAS:-dev,ray}"
STAMP="$VENV/.cvserve-installed"

inputs_hash() {
    (cd "$ROOT" && cat pyproject.toml requirements/*.txt scripts/bootstrap.sh scripts/install_detectron2.py \
        && echo "extras=$EXTRAS") | sha256sum | cut -d' ' -f1
}

want="$(inputs_hash)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/cvserve" ]]; then
    exit 0
fi

start=$SECONDS
echo "==> setting up $VENV (extras: $EXTRAS)"
if [[ ! -x "$VENV/bin/python" ]]; then
    if ! command -v "$PYTHON" >/dev/null; then
        echo "error: $PYTHON not found; cvserve needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
CONSTRAINTS=(-c "$ROOT/requirements/constraints.txt")

"${PIP[@]}" install -q "pip>=24" "setuptools<82" wheel "${CONSTRAINTS[@]}"
echo "==> torch"
"${PIP[@]}" install -q -r "$ROOT/requirements/torch.txt" "${CONSTRAINTS[@]}"
echo "==> cvserve[$EXTRAS]"
"${PIP[@]}" install -q -e "$ROOT[$EXTRAS]" "${CONSTRAINTS[@]}"
# After cvserve, which lists detectron2's runtime dependencies itself (see pyproject.toml).
echo "==> detectron2 (hash-pinned sdist, pure Python build)"
"$VENV/bin/python" "$ROOT/scripts/install_detectron2.py"

echo "$want" > "$STAMP"
echo "==> environment ready in $((SECONDS - start)) s: $VENV/bin/cvserve"
