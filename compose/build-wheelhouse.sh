#!/usr/bin/env bash
# Fill wheelhouse/ (at the repo root) with everything the image installs offline:
#   - the runtime deps as manylinux cp311 x86_64 binary wheels (the image's Python is
#     3.11 whatever the host runs), downloaded once and reused;
#   - zkv itself as a wheel, rebuilt on every run (it is the part that changes).
#
# Env: PY (default .venv/bin/python, else python3), WHEELHOUSE (default wheelhouse),
#      ZKV_WHEEL_REFRESH=1 to re-download the deps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELHOUSE="${WHEELHOUSE:-wheelhouse}"
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Keep in sync with [project].dependencies in pyproject.toml.
DEPS=(pyzmq msgpack blake3 loguru prometheus_client)

log() { printf '[wheelhouse] %s\n' "$*" >&2; }
die() { printf '[wheelhouse] ERROR: %s\n' "$*" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# `make image` creates .venv first; run on its own (no venv, or a python without pip,
# as Debian's python3 is), the script builds with a throwaway venv instead of failing.
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    log "$PY has no pip: using a throwaway venv"
    python3 -m venv "$tmp/venv" >/dev/null 2>&1 \
        || die "$PY has no pip and 'python3 -m venv' failed (run make venv first)"
    PY="$tmp/venv/bin/python"
fi
mkdir -p "$WHEELHOUSE"

have_wheel() {  # have_wheel NAME: a wheel for NAME is already in the wheelhouse
    compgen -G "$WHEELHOUSE/${1}-*.whl" >/dev/null
}

missing=()
for dep in "${DEPS[@]}"; do
    if [[ "${ZKV_WHEEL_REFRESH:-0}" == "1" ]] || ! have_wheel "$dep"; then
        missing+=("$dep")
    fi
done

if ((${#missing[@]})); then
    log "downloading manylinux cp311 wheels: ${missing[*]}"
    "$PY" -m pip download -q -d "$WHEELHOUSE" --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform any \
        "${missing[@]}" || die "pip download failed (is the package index reachable from the host?)"
else
    log "reusing downloaded wheels: ${DEPS[*]}"
fi

log "building the zkv wheel"
rm -f "$WHEELHOUSE"/zkv-*.whl
# Build isolation fetches setuptools>=68 from the index (host side only).
# A fixed SOURCE_DATE_EPOCH makes the wheel byte-identical while the sources are, so
# the image build stays cached.
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-315532800}" "$PY" -m pip wheel -q --no-deps -w "$WHEELHOUSE" . >"$tmp/wheel.log" 2>&1 \
    || { cat "$tmp/wheel.log" >&2; die "pip wheel of zkv failed"; }
rm -rf build
# zkv/<pkg> are symlinks to the top-level folders: the wheel must hold their files, not
# the links (setuptools follows them on the host; check, so the image never ships empty).
"$PY" - "$WHEELHOUSE" <<'EOF' || die "the zkv wheel lacks the subpackages (symlinks not followed?)"
import glob, sys, zipfile
names = set(zipfile.ZipFile(glob.glob(sys.argv[1] + "/zkv-*.whl")[0]).namelist())
need = ["zkv/py.typed", "zkv/protocol/ring.py", "zkv/broker/main.py",
        "zkv/storage_node/main.py", "zkv/client/cli.py", "zkv/ops/cluster.py"]
missing = [n for n in need if n not in names]
sys.exit(f"missing from the wheel: {missing}" if missing else 0)
EOF
log "wheelhouse ready: $(cd "$WHEELHOUSE" && ls -1 *.whl | tr '\n' ' ')"
