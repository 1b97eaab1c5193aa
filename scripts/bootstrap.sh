#!/usr/bin/env bash
# Create or update the project environment in .venv/ from the repository's own files.
#
# Idempotent and quick when nothing changed: a stamp in .venv records a hash of every
# input (pyproject.toml, requirements/, this script, the detectron2 installer, the C
# sources of the RoIAlign and NMS kernels the install compiles and their shared header),
# and the install runs again only when one of them differs.
#
# Environment:
#   PYTHON          interpreter used to create the venv (default: python3.11)
#   CVSERVE_EXTRAS  extras to install (default: dev,ray; the Docker image uses "ray")
#   CVSERVE_VENV    where the environment lives (default: <repo>/.venv)
#   CVSERVE_TORCH_VARIANT  a PyTorch wheel variant instead of the registry's default build:
#                   cu126, cu128, cu129 ... (CUDA 12.x, for NVIDIA drivers older than 580) or cpu;
#                   installs torch and torchvision from https://download.pytorch.org/whl/<variant>
#   CVSERVE_TORCH_INDEX    the same from any PyTorch-style wheel index URL (a mirror; https only)
#   CVSERVE_TORCH_REQUIREMENTS  a requirements file pinning torch, torchvision and their
#                   dependencies with --hash lines: installed with --require-hashes (from the
#                   index above, if one is set)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CVSERVE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
EXTRAS="${CVSERVE_EXTRAS:-dev,ray}"
STAMP="$VENV/.cvserve-installed"
TORCH_VARIANT="${CVSERVE_TORCH_VARIANT:-}"
TORCH_INDEX="${CVSERVE_TORCH_INDEX:-}"
TORCH_REQUIREMENTS="${CVSERVE_TORCH_REQUIREMENTS:-}"

if [[ -n "$TORCH_VARIANT" ]]; then
    if [[ ! "$TORCH_VARIANT" =~ ^(cu[0-9]{3}|cpu|rocm[0-9]+(\.[0-9]+)*)$ ]]; then
        echo "error: CVSERVE_TORCH_VARIANT must look like cu126, cu128 or cpu, got '$TORCH_VARIANT'" >&2
        exit 1
    fi
    if [[ -n "$TORCH_INDEX" ]]; then
        echo "error: set CVSERVE_TORCH_VARIANT or CVSERVE_TORCH_INDEX, not both" >&2
        exit 1
    fi
    TORCH_INDEX="https://download.pytorch.org/whl/$TORCH_VARIANT"
fi
if [[ -n "$TORCH_INDEX" && ! "$TORCH_INDEX" =~ ^https://[^[:space:]]+$ ]]; then
    echo "error: CVSERVE_TORCH_INDEX must be an https:// URL, got '$TORCH_INDEX'" >&2
    exit 1
fi
if [[ -n "$TORCH_REQUIREMENTS" && ! -f "$TORCH_REQUIREMENTS" ]]; then
    echo "error: CVSERVE_TORCH_REQUIREMENTS: no such file: $TORCH_REQUIREMENTS" >&2
    exit 1
fi

inputs_hash() {
    (cd "$ROOT" && cat pyproject.toml requirements/*.txt scripts/bootstrap.sh scripts/install_detectron2.py \
        models/instance/_roi_align.c models/instance/_nms.c models/instance/_kernels.h \
        && echo "extras=$EXTRAS torch_index=$TORCH_INDEX" \
        && if [[ -n "$TORCH_REQUIREMENTS" ]]; then cat "$TORCH_REQUIREMENTS"; fi) | sha256sum | cut -d' ' -f1
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
TORCH_ARGS=(-r "$ROOT/requirements/torch.txt" "${CONSTRAINTS[@]}")
if [[ -n "$TORCH_REQUIREMENTS" ]]; then
    TORCH_ARGS=(--require-hashes -r "$TORCH_REQUIREMENTS")
fi
if [[ -n "$TORCH_INDEX" ]]; then
    # Only this index for torch: its builds for other CUDA versions share the version number.
    TORCH_ARGS+=(--index-url "$TORCH_INDEX")
fi
echo "==> torch${TORCH_INDEX:+ from $TORCH_INDEX}${TORCH_REQUIREMENTS:+ (hash-checked: $TORCH_REQUIREMENTS)}"
# The builds of one torch version for different CUDA versions share its version number, so
# pip would keep the one installed: a different choice of build removes it first.
TORCH_SOURCE="$TORCH_INDEX $(if [[ -n "$TORCH_REQUIREMENTS" ]]; then sha256sum < "$TORCH_REQUIREMENTS"; fi)"
if [[ -f "$VENV/.cvserve-torch" && "$(cat "$VENV/.cvserve-torch")" != "$TORCH_SOURCE" ]]; then
    echo "==> another torch build was chosen: removing the installed one"
    "${PIP[@]}" uninstall -q -y torch torchvision
fi
"${PIP[@]}" install -q "${TORCH_ARGS[@]}"
echo "$TORCH_SOURCE" > "$VENV/.cvserve-torch"
echo "==> cvserve[$EXTRAS]"
"${PIP[@]}" install -q -e "$ROOT[$EXTRAS]" "${CONSTRAINTS[@]}"
if [[ ",$EXTRAS," == *,dev,* ]]; then
    echo "==> lvis, tidecv (without their opencv-python: requirements/no-deps.txt)"
    "${PIP[@]}" install -q --no-deps -r "$ROOT/requirements/no-deps.txt"
fi
# After cvserve, which lists detectron2's runtime dependencies itself (see pyproject.toml).
echo "==> detectron2 (hash-pinned sdist, pure Python build)"
"$VENV/bin/python" "$ROOT/scripts/install_detectron2.py"

echo "$want" > "$STAMP"
echo "==> environment ready in $((SECONDS - start)) s: $VENV/bin/cvserve"
