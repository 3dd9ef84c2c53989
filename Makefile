# token-broker: the two commands of the README are `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test check fmt fmt-check clippy build bench bench-e2e bench-misses bench-memory profile clean

## Build and run the demo: broker on 127.0.0.1:8080 (admin 9090) in front of an embedded sandbox Truora.
run:
	$(CARGO) run --locked --bin token-broker -- demo

## The whole test suite: unit, service (no sockets), end-to-end (loopback) and CLI tests.
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

## Criterion benchmarks of the issuance core and its parts (not part of the tests; nothing fails on timing).
bench:
	$(CARGO) bench --locked --bench issuance --bench parts

## End-to-end load benchmark on loopback: release build, then wrk against the broker, a bare hyper
## server answering the same bytes and nginx as a caching proxy; prints req/s, p50, p99, ratios.
## Needs wrk, nginx and curl (Debian: apt-get install -y wrk nginx curl). About 5 minutes.
bench-e2e:
	benches/e2e/run.sh hits

## Misses on loopback: what the broker adds to the upstream's latency, and 100,000 distinct
## misses with memory bounded by cache.max_entries. Needs wrk and curl.
bench-misses:
	benches/e2e/run.sh misses

## Memory of cached tokens: 1,000,000 tokens through the miss path, resident set before and after,
## then more users than cache.max_entries to show the bound (in-process, no sockets).
bench-memory:
	$(CARGO) bench --locked --bench memory

## Instructions per cache hit under callgrind (repeatable where timings are not). Needs valgrind.
profile:
	benches/profile.sh

clean:
	$(CARGO) clean
