#!/usr/bin/env bash
# Creates .venv at the repository root with the pinned Python tools the test
# suite uses (schemathesis, for tests/tests/cache_api_openapi.rs). Idempotent:
# a venv that already has the pinned version is left alone.
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"

if [[ -x "$venv/bin/schemathesis" ]] &&
    [[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" == "$SCHEMATHESIS_VERSION" ]]; then
    exit 0
fi

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
echo "python tools ready: $venv/bin/schemathesis ($SCHEMATHESIS_VERSION)"
