# Herald — the two commands a newcomer needs are `make dev` and `make test`.
.PHONY: help dev readme-examples test test-cluster lint fmt bench check-deploy build clean-dev fuzz fuzz-smoke

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

dev: ## run Herald's four services (capture, broadcast, cache API, gateway) on throwaway Postgres/Redis and watch invalidations; writes .dev/env (an exported DATABASE_URL/REDIS_URL only with HERALD_DEV_USE_EXISTING=1; the first run builds for several minutes)
	scripts/dev.sh

readme-examples: ## run the README's examples against a running `make dev` (in another shell)
	scripts/readme-examples.sh

test: ## the whole suite against real Postgres and Redis (DATABASE_URL, REDIS_URL; local defaults); a .venv with schemathesis and the Python client; the Python client's suite (both clients run the shared near-cache vectors of clients/vectors: herald-client's `vectors` test under nextest, test_vectors.py under pytest); the TypeScript client's tests (npm ci, Chromium)
	scripts/setup-python.sh
	cargo build --workspace --bins
	cargo nextest run --workspace
	scripts/test-python.sh
	scripts/test-typescript.sh

test-cluster: ## spine, fault, cache-API, gateway, slim coherence and cluster tests against a local Redis Cluster (3 masters + 3 replicas per test process, started by the tests)
	cargo build --workspace --bins
	HERALD_TEST_REDIS=cluster cargo nextest run -p herald-tests --test spine --test faults --test cache_api --test gateway --test coherence --test cluster

lint: ## formatting and clippy, as CI runs them
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	cargo fmt --all

bench: ## every benchmark: invalidation, cache, coherence, ws, the Python near cache (each prints a table and a JSON line)
	cargo run --release -p herald-bench -- invalidation
	cargo run --release -p herald-bench -- cache
	cargo run --release -p herald-bench -- coherence
	cargo run --release -p herald-bench -- ws
	scripts/setup-python.sh
	cargo build --release -p herald-capture -p herald-broadcast -p herald-cache-api
	HERALD_BIN_DIR=$${CARGO_TARGET_DIR:-target}/release .venv/bin/python clients/python/bench.py

check-deploy: ## static checks of docker-compose.yml and the kustomize manifests
	scripts/check-deploy.sh

build: ## release binaries
	cargo build --release -p herald-capture -p herald-broadcast -p herald-cache-api -p herald-gateway

fuzz: ## cargo-fuzz every decoder of outside bytes, one target at a time, FUZZ_SECONDS each (default 600); prints executions and crashes
	fuzz/run.sh

fuzz-smoke: ## every fuzz target for 25 s (a short check, not part of make test)
	FUZZ_SECONDS=25 fuzz/run.sh

clean-dev: ## remove the throwaway dev servers' data
	rm -rf .dev
