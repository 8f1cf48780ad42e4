#!/usr/bin/env bash
# scripts/test-typescript.sh — the TypeScript client's suite, run by `make test`
# after `cargo build --workspace --bins`:
#   npm ci (package-lock.json), build (ESM + CJS + .d.ts), tsc --strict on the
#   sources and tests, publint, then vitest: unit tests (fake socket),
#   integration tests against real herald-gateway processes and Redis, and the
#   browser test (Debian's chromium, driven by playwright-core) against the
#   real services and Postgres. Screenshots land in clients/typescript/test-artifacts/.
#
# Environment: DATABASE_URL, REDIS_URL (as for the Rust tests),
# CARGO_TARGET_DIR (the binaries are in its debug/), CHROMIUM (default
# /usr/bin/chromium).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

command -v node >/dev/null 2>&1 || { echo "test-typescript: node not found (Node.js >= 20 is needed)" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
((major >= 20)) || { echo "test-typescript: Node.js $(node --version) is too old (>= 20)" >&2; exit 1; }
[[ -x ${CHROMIUM:-/usr/bin/chromium} ]] ||
    { echo "test-typescript: ${CHROMIUM:-/usr/bin/chromium} not found; apt-get install -y chromium (.ci/run does)" >&2; exit 1; }

export HERALD_BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
cd "$ROOT/clients/typescript"
npm ci --no-audit --no-fund
npm test
