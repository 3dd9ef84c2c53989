# token-broker: the two commands of the README are `make run` and `make test`.
CARGO ?= cargo
PYTHON ?= python3
# The container image's HEALTHCHECK probe is a crate of its own (deploy/docker/healthcheck).
HEALTHCHECK := --manifest-path deploy/docker/healthcheck/Cargo.toml
HEALTHCHECK_TARGET := --target-dir $(or $(CARGO_TARGET_DIR),target)/healthcheck

.PHONY: run test test-py lint-deploy check fmt fmt-check clippy build bench clean

## Build and run the demo: broker on 127.0.0.1:8080 (admin 9090) in front of an embedded sandbox Truora.
run:
	$(CARGO) run --locked --bin token-broker -- demo

## The whole test suite: unit, service (no sockets), end-to-end (loopback) and CLI tests, then
## the Python checks of tests/py against the debug binary cargo test has just built: the OpenAPI
## document against live answers, the README's shell snippets against the demo, the client
## examples, the Dockerfile, the Kubernetes manifests and the systemd unit.
## The Python packages: pip install -r tests/py/requirements.txt (.ci/run does).
test:
	$(CARGO) test --locked
	$(MAKE) --no-print-directory test-py

## Only the Python checks (needs target/debug/token-broker: `cargo build` or `make test`).
test-py:
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m unittest discover --start-directory tests/py --top-level-directory tests/py

## Only the static checks of deploy/ (Dockerfile conventions, Kubernetes schemas, systemd unit).
lint-deploy:
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m unittest discover --start-directory tests/py --top-level-directory tests/py --pattern 'test_deploy_*.py'

## Everything a commit must pass: formatting, clippy with warnings as errors, the tests.
check: fmt-check clippy test

fmt:
	$(CARGO) fmt
	$(CARGO) fmt $(HEALTHCHECK)

fmt-check:
	$(CARGO) fmt --check
	$(CARGO) fmt --check $(HEALTHCHECK)

clippy:
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(CARGO) clippy --locked $(HEALTHCHECK) $(HEALTHCHECK_TARGET) -- -D warnings

## The release binary: target/release/token-broker.
build:
	$(CARGO) build --locked --release

## Criterion benchmarks of the issuance core (not part of the tests; nothing fails on timing).
bench:
	$(CARGO) bench --locked --bench issuance

clean:
	$(CARGO) clean
