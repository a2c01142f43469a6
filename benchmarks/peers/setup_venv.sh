#!/usr/bin/env bash
# Create .venv-bench (repo root, gitignored) for the peer speed benchmark: torch 2.13.0 (CPU),
# numpy, pandas, pyarrow, DeepCTR-Torch and FuxiCTR.
#
#   bash benchmarks/peers/setup_venv.sh           # idempotent: does nothing when already set up
#   bash benchmarks/peers/setup_venv.sh --force   # re-run every install step
#
# torch is pinned on every pip command line, so no peer's requirements can make pip swap it for
# another (multi-GB CUDA) build; the script checks the version afterwards as well.
# A peer that fails to install or import does not stop the script: the reason is written to
# .venv-bench/peer-status/<peer>.txt, and run_peer.py reports it as its JSON "error". The marker
# file .venv-bench/.bench-ready is written only when every peer imports, so a later run retries.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-bench"
PY="$VENV/bin/python"
STATUS_DIR="$VENV/peer-status"
MARKER="$VENV/.bench-ready"

TORCH_VERSION="2.13.0"
DEEPCTR_VERSION="0.3.0"
FUXICTR_VERSION="2.3.10"
SPEC="v1 torch==$TORCH_VERSION deepctr-torch==$DEEPCTR_VERSION fuxictr==$FUXICTR_VERSION"

if [[ "${1:-}" != "--force" && -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" ]]; then
    echo "setup_venv: $VENV is already set up ($SPEC)"
    exit 0
fi

pip_install() {
    "$PY" -m pip install --disable-pip-version-check --progress-bar off "$@"
}

torch_ok() {
    local v
    v="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" || return 1
    [[ "${v%%+*}" == "$TORCH_VERSION" ]]
}

# peer_pip NAME PIP_ARGS...: one pip command for a peer; on failure the reason goes to its
# status file and the function returns 1.
peer_pip() {
    local name="$1"
    shift
    local log="$STATUS_DIR/$name.log"
    echo "setup_venv: $name: pip install $*"
    if ! pip_install "$@" >>"$log" 2>&1; then
        {
            echo "pip install $* failed:"
            tail -n 15 "$log"
        } >"$STATUS_DIR/$name.txt"
        echo "setup_venv: $name FAILED (see $STATUS_DIR/$name.txt)"
        return 1
    fi
    if ! torch_ok; then
        echo "pip install $* changed torch away from $TORCH_VERSION (restored)" \
            >"$STATUS_DIR/$name.txt"
        pip_install --force-reinstall --no-deps "torch==$TORCH_VERSION" >>"$log" 2>&1
        return 1
    fi
}

# peer_import NAME MODULES: the import check that decides the peer's status ("ok" or why not).
peer_import() {
    local name="$1" modules="$2" err
    if ! err="$("$PY" -c "import $modules" 2>&1)"; then
        {
            echo "installed, but 'import $modules' fails:"
            echo "$err" | tail -n 15
        } >"$STATUS_DIR/$name.txt"
        echo "setup_venv: $name installed but does not import (see $STATUS_DIR/$name.txt)"
        return 1
    fi
    echo "ok" >"$STATUS_DIR/$name.txt"
    echo "setup_venv: $name ok"
}

if [[ ! -x "$PY" ]]; then
    echo "setup_venv: creating $VENV"
    python3 -m venv "$VENV" || { echo "setup_venv: python3 -m venv failed" >&2; exit 1; }
fi
mkdir -p "$STATUS_DIR"

echo "setup_venv: pip install torch==$TORCH_VERSION numpy pandas pyarrow"
if ! pip_install "torch==$TORCH_VERSION" numpy pandas pyarrow >"$VENV/base-install.log" 2>&1; then
    tail -n 20 "$VENV/base-install.log" >&2
    echo "setup_venv: base install failed (log: $VENV/base-install.log)" >&2
    exit 1
fi
if ! torch_ok; then
    echo "setup_venv: torch in $VENV is not $TORCH_VERSION" >&2
    exit 1
fi

rm -f "$STATUS_DIR"/*.log "$STATUS_DIR"/*.txt

# DeepCTR-Torch requires torch>=2.4.0, tqdm, scikit-learn, and imports requests (its version
# check) without declaring it: its real needs are named by hand next to the torch pin, then the
# package itself goes in with --no-deps.
peer_pip deepctr "torch==$TORCH_VERSION" tqdm scikit-learn requests \
    && peer_pip deepctr --no-deps "deepctr-torch==$DEEPCTR_VERSION" \
    && peer_import deepctr deepctr_torch

# FuxiCTR declares no torch requirement (its needs: pandas, pyyaml, scikit-learn, numpy, h5py,
# tqdm, pyarrow, polars, ray[data]>=2.52, pydantic); torch is pinned on the line all the same.
peer_pip fuxictr "torch==$TORCH_VERSION" "fuxictr==$FUXICTR_VERSION" \
    && peer_import fuxictr "fuxictr.pytorch.models, fuxictr.pytorch.dataloaders, ray"

if ! torch_ok; then
    echo "setup_venv: torch in $VENV is no longer $TORCH_VERSION" >&2
    exit 1
fi
echo "setup_venv: peer status:"
all_ok=1
for f in "$STATUS_DIR"/*.txt; do
    echo "  $(basename "$f" .txt): $(head -n 1 "$f")"
    [[ "$(cat "$f")" == "ok" ]] || all_ok=0
done
if ((all_ok)); then
    echo "$SPEC" >"$MARKER"
    echo "setup_venv: done"
else
    rm -f "$MARKER"
    echo "setup_venv: done, but a peer is unusable; the next run of this script retries it"
fi
