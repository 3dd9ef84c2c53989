# token-broker: the two commands of the README are `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test check fmt fmt-check clippy build bench clean fuzz deny

FUZZ_TARGETS = form_body json_body cache_key upstream_answer
FUZZ_SECONDS ?= 60

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

## Criterion benchmarks of the issuance core (not part of the tests; nothing fails on timing).
bench:
	$(CARGO) bench --locked --bench issuance

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

## Licences, banned and duplicate crates, sources (and advisories when the database can be
## fetched). Needs cargo-deny (`cargo install cargo-deny`).
deny:
	@command -v cargo-deny >/dev/null || { echo "make deny needs cargo-deny: cargo install cargo-deny"; exit 1; }
	$(CARGO) deny check bans licenses sources

clean:
	$(CARGO) clean
