#!/usr/bin/env bash
# The Python client's checks and tests (clients/python), in the .venv that
# scripts/setup-python.sh makes: ruff, mypy, the proto stubs against proto/,
# then pytest (unit tests, the Django conformance suite, the Odoo helper and
# the integration tests, which start capture, broadcast and cache-api
# processes from the Cargo target directory: build them first, as make test
# does). Fails loudly on anything missing.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/bin/python"
if [[ ! -x "$py" ]]; then
    echo "no $root/.venv: run scripts/setup-python.sh first" >&2
    exit 1
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
for bin in herald-capture herald-broadcast herald-cache-api; do
    if [[ ! -x "$CARGO_TARGET_DIR/debug/$bin" ]]; then
        echo "$CARGO_TARGET_DIR/debug/$bin is missing: cargo build --workspace --bins first" >&2
        exit 1
    fi
done

cd "$root/clients/python"
"$py" -m ruff check src tests tools bench.py
"$py" -m ruff format --check src tests tools bench.py
"$py" -m mypy
"$py" tools/gen_proto.py --check
"$py" -m pytest -q tests
