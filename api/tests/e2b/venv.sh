#!/usr/bin/env bash
# Print the path of a Python virtual environment with requirements.txt (the
# pinned official e2b SDK and pytest) installed, in the cache
# ($SANDBOX_CACHE/python/, keyed by the file's digest); make it first if it
# is missing. It is installed in a temporary directory and renamed into
# place, so a failed install is never taken for a good one. Run it with
# `<venv>/bin/python -m ...` (scripts in bin/ name the temporary path).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
requirements="$here/requirements.txt"
cache="${SANDBOX_CACHE:-$HOME/.cache/sandbox}/python"
venv="$cache/e2b-$(sha256sum "$requirements" | cut -c1-16)"
if [ ! -e "$venv/.complete" ]; then
    python=/usr/bin/python3
    [ -x "$python" ] || python=python3
    mkdir -p "$cache"
    tmp="$(mktemp -d "$cache/tmp-venv-XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "[e2b] installing $requirements into $venv" >&2
    "$python" -m venv "$tmp" || { echo "[e2b] $python -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
    "$tmp/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    touch "$tmp/.complete"
    # Another run may have made it meanwhile: keep the first.
    mv -T "$tmp" "$venv" 2>/dev/null || true
fi
echo "$venv"
