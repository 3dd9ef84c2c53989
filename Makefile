# token-broker: the two commands of the README are `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test check fmt fmt-check clippy build bench clean rules status-screenshot

## Build and run the demo: broker on 127.0.0.1:8080 (admin 9090) in front of an embedded sandbox Truora.
run:
	$(CARGO) run --locked --bin token-broker -- demo

## The whole test suite: unit, service (no sockets), end-to-end (loopback) and CLI tests.
## tests/observability.rs runs promtool (check rules, test rules, check metrics on a live scrape)
## and headless Chromium on the status page: .ci/run installs both.
test:
	$(CARGO) test --locked

## Everything a commit must pass: formatting, clippy with warnings as errors, the tests.
check: fmt-check clippy test

fmt:
	$(CARGO) fmt

fmt-check:
	$(CARGO) fmt --check

clippy:
	$(CARGO) clippy --locked --all-targets -- -D warnings

## The release binary: target/release/token-broker.
build:
	$(CARGO) build --locked --release

## Criterion benchmarks of the issuance core (not part of the tests; nothing fails on timing).
bench:
	$(CARGO) bench --locked --bench issuance

clean:
	$(CARGO) clean

## Check and unit-test the Prometheus rules alone (promtool: Debian package prometheus).
rules:
	promtool check rules deploy/prometheus/*.rules.yml
	promtool test rules deploy/prometheus/tests/*.test.yml

## Refresh docs/status-page.png from the browser test.
status-screenshot:
	TOKEN_BROKER_STATUS_SCREENSHOT=$(CURDIR)/docs/status-page.png $(CARGO) test --locked --test observability -- status_page
