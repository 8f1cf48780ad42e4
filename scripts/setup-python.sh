#!/usr/bin/env bash
# Creates .venv at the repository root with the Python tools the test suite
# uses: a pinned schemathesis (tests/tests/cache_api_openapi.rs) and the
# Python client with its test extras (clients/python, run by
# scripts/test-python.sh). Idempotent: what is already installed at the
# wanted version is left alone, so a warm run takes a second.
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
pip() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"

if [[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ]]; then
    pip "schemathesis==$SCHEMATHESIS_VERSION"
    echo "python tools ready: $venv/bin/schemathesis ($SCHEMATHESIS_VERSION)"
fi

# The client, editable, with its test extras; reinstalled when its
# pyproject.toml changes.
stamp="$venv/.herald-client-pyproject"
if ! cmp -s "$root/clients/python/pyproject.toml" "$stamp" 2>/dev/null; then
    pip -e "$root/clients/python[test]"
    cp "$root/clients/python/pyproject.toml" "$stamp"
    echo "python client ready: $venv (herald-client, editable, with test extras)"
fi
