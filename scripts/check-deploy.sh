#!/usr/bin/env bash
# scripts/check-deploy.sh — static checks of the deployment files. Starts
# nothing, builds nothing, needs no Docker daemon and no cluster.
#
#   - bash -n scripts/*.sh (and shellcheck, when installed)
#   - deploy/k8s/herald.toml is identical to deploy/herald.toml
#   - docker-compose config -q   (docker-compose v1, else `docker compose` v2;
#     if neither exists and we are root with apt-get, installs docker-compose)
#   - kubectl kustomize deploy/k8s  (or `kustomize build`)
#   - Redis runs with AOF on (appendonly yes, appendfsync set) in both
#
# Exits non-zero when any check fails.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

failures=0
pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*" >&2; failures=$((failures + 1)); }

# --- shell scripts ----------------------------------------------------------
for f in scripts/*.sh; do
    if bash -n "$f"; then pass "bash -n $f"; else fail "bash -n $f"; fi
done
if command -v shellcheck >/dev/null 2>&1; then
    if shellcheck -S warning scripts/*.sh; then pass "shellcheck scripts/*.sh"; else fail "shellcheck scripts/*.sh"; fi
fi

# --- config copy used by kustomize ------------------------------------------
if cmp -s deploy/herald.toml deploy/k8s/herald.toml; then
    pass "deploy/k8s/herald.toml == deploy/herald.toml"
else
    fail "deploy/k8s/herald.toml differs from deploy/herald.toml (kustomize needs a copy inside deploy/k8s; run: cp deploy/herald.toml deploy/k8s/herald.toml)"
fi

# --- docker compose ----------------------------------------------------------
compose=()
find_compose() {
    if command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    elif command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    fi
}
find_compose
if ((${#compose[@]} == 0)) && ((EUID == 0)) && command -v apt-get >/dev/null 2>&1; then
    echo "docker-compose not found; installing it with apt-get" >&2
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; then
        find_compose
    fi
fi
if ((${#compose[@]} == 0)); then
    fail "docker-compose config: neither docker-compose nor 'docker compose' is available (install docker-compose, or run this as root on a Debian/Ubuntu machine to have it installed)"
elif out=$("${compose[@]}" -f docker-compose.yml config -q 2>&1); then
    [[ -n $out ]] && printf '%s\n' "$out"
    pass "${compose[*]} config -q"
else
    printf '%s\n' "$out" >&2
    fail "${compose[*]} config -q"
fi

# --- kustomize ---------------------------------------------------------------
kustomize=()
if command -v kubectl >/dev/null 2>&1; then
    kustomize=(kubectl kustomize)
elif [[ -x /usr/bin/kubectl ]]; then
    kustomize=(/usr/bin/kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
    kustomize=(kustomize build)
fi
if ((${#kustomize[@]} == 0)); then
    fail "kustomize: neither kubectl nor kustomize is installed (install kubectl: https://kubernetes.io/docs/tasks/tools/)"
elif out=$("${kustomize[@]}" deploy/k8s 2>&1 >/dev/null); then
    pass "${kustomize[*]} deploy/k8s"
else
    printf '%s\n' "$out" >&2
    fail "${kustomize[*]} deploy/k8s"
fi

# --- Redis persistence ---------------------------------------------------------
# The event stream must survive a Redis restart (README "Durability").
aof_on() { grep -Eq '"--appendonly", *"yes"' "$1" && grep -Eq '"--appendfsync", *"(everysec|always)"' "$1"; }
for f in docker-compose.yml deploy/k8s/redis.yaml; do
    if aof_on "$f"; then pass "redis AOF on in $f"; else fail "redis AOF not on in $f (--appendonly yes --appendfsync everysec)"; fi
done
if grep -q 'redis.yaml' deploy/k8s/kustomization.yaml; then
    pass "deploy/k8s renders redis.yaml"
else
    fail "deploy/k8s/kustomization.yaml does not list redis.yaml"
fi

if ((failures)); then
    printf '%d check(s) failed\n' "$failures" >&2
    exit 1
fi
echo "all deployment checks passed"
