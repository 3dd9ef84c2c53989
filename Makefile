# token-broker: the two commands of the README are `make run` and `make test`.
CARGO ?= cargo
PYTHON ?= python3
# The container image's HEALTHCHECK probe is a crate of its own (deploy/docker/healthcheck).
HEALTHCHECK := --manifest-path deploy/docker/healthcheck/Cargo.toml
HEALTHCHECK_TARGET := --target-dir $(or $(CARGO_TARGET_DIR),target)/healthcheck

.PHONY: run test test-deps test-py test-instructions lint-deploy check fmt fmt-check clippy build bench bench-e2e bench-misses bench-memory profile clean fuzz deny rules status-screenshot

FUZZ_TARGETS = form_body json_body cache_key upstream_answer service_account_token webhook_delivery
FUZZ_SECONDS ?= 60

## Build and run the demo: broker on 127.0.0.1:8080 (admin 9090) in front of an embedded sandbox Truora.
run:
	$(CARGO) run --locked --bin token-broker -- demo

## The whole test suite: unit, service (no sockets), end-to-end (loopback) and CLI tests, then
## the Python checks of tests/py against the debug binary cargo test has just built: the OpenAPI
## document against live answers (case by case, and Schemathesis on both listeners), the README's shell snippets against the demo, the client
## examples, the Dockerfile, the Kubernetes manifests and the systemd unit.
## tests/observability.rs runs promtool (check rules, test rules, check metrics on a live scrape)
## and headless Chromium on the status page. Last, the instruction budget of a cache hit under
## callgrind. .ci/run installs all of it.
test: test-deps
	$(CARGO) test --locked
	$(MAKE) --no-print-directory test-py
	$(MAKE) --no-print-directory test-instructions

## What the tests need beyond cargo (promtool, Chromium, curl, Python packages...), installed when
## missing (as root; otherwise it says what to install). Quick when all is there.
test-deps:
	@bash tests/install-deps.sh

## Only the Python checks (needs target/debug/token-broker: `cargo build` or `make test`).
test-py:
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m unittest discover --start-directory tests/py --top-level-directory tests/py

## Instructions per cache hit under callgrind against benches/instructions.budget: a count, not a
## timing, so a busy machine cannot fail it (x86_64 only; elsewhere it says so and passes).
test-instructions:
	benches/profile.sh --check

## Only the static checks of deploy/ (Dockerfile conventions, Kubernetes schemas, systemd unit).
lint-deploy:
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m unittest discover --start-directory tests/py --top-level-directory tests/py --pattern 'test_deploy_*.py'

## Everything a commit must pass: formatting, clippy with warnings as errors, cargo-deny, the tests.
check: fmt-check clippy deny test

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

## Fuzz each target for FUZZ_SECONDS (default 60) from its committed seeds. Needs cargo-fuzz
## (`cargo install cargo-fuzz`); runs on the stable toolchain through RUSTC_BOOTSTRAP.
## A crash stops it: fix it, then copy the input to fuzz/regressions/<target>/ so make test
## replays it for good.
fuzz:
	@command -v cargo-fuzz >/dev/null || { echo "make fuzz needs cargo-fuzz: cargo install cargo-fuzz"; exit 1; }
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p fuzz/corpus/$$t && cp -n fuzz/seeds/$$t/* fuzz/corpus/$$t/ 2>/dev/null; \
	    echo "== fuzzing $$t for $(FUZZ_SECONDS)s"; \
	    RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

## Licences, banned and duplicate crates, sources, and advisories. Needs cargo-deny
## (`cargo install cargo-deny`). Advisories: from the RustSec snapshot ADVISORY_SNAPSHOT when it
## exists (unpacked where cargo-deny looks for the database, checked offline, its date printed),
## else from GitHub; where neither can be had it says so.
ADVISORY_SNAPSHOT ?= ../shared/rustsec-advisory-db.tar.gz
ADVISORY_DB := $(HOME)/.cargo/advisory-dbs/advisory-db-3157b0e258782691
deny:
	@command -v cargo-deny >/dev/null || { echo "make deny needs cargo-deny: cargo install cargo-deny"; exit 1; }
	$(CARGO) deny check bans licenses sources
	@if [ -f "$(ADVISORY_SNAPSHOT)" ]; then \
	    rm -rf "$(ADVISORY_DB)" && mkdir -p "$(ADVISORY_DB)" && \
	    tar xzf "$(ADVISORY_SNAPSHOT)" --strip-components=1 -C "$(ADVISORY_DB)" && \
	    echo "cargo deny: advisories from the snapshot $(ADVISORY_SNAPSHOT), as of $$(git -C "$(ADVISORY_DB)" log -1 --format=%cs) (advisories published later are not in it)" && \
	    $(CARGO) deny --offline check advisories; \
	elif $(CARGO) deny fetch db >/dev/null 2>&1; then \
	    echo "cargo deny: advisories from the RustSec database fetched now" && \
	    $(CARGO) deny --offline check advisories; \
	else \
	    echo "cargo deny: advisories NOT checked: no snapshot at $(ADVISORY_SNAPSHOT) and the RustSec database cannot be fetched"; \
	fi

clean:
	$(CARGO) clean

## Check and unit-test the Prometheus rules alone (promtool: Debian package prometheus).
rules:
	promtool check rules deploy/prometheus/*.rules.yml
	promtool test rules deploy/prometheus/tests/*.test.yml

## Refresh docs/status-page.png from the browser test.
status-screenshot:
	TOKEN_BROKER_STATUS_SCREENSHOT=$(CURDIR)/docs/status-page.png $(CARGO) test --locked --test observability -- status_page
