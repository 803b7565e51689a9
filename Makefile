# Sluice developer commands. See README.md.
#
#   make demo    set up everything on a fresh machine and run the demo (idempotent)
#   make test    run every test: pgrx unit tests, client tests, integration tests
#   make stop    stop the project-local cluster

SHELL := /bin/bash
export SLUICE_TEST_DSN ?= host=127.0.0.1 port=28815 user=postgres dbname=sluice
PGRX_TEST_DATA := /tmp/sluice-pgrx-test-data

.PHONY: demo test stop deps install start psql bench

deps:
	@scripts/dev.sh deps

install: deps
	@scripts/dev.sh install

start: install
	@scripts/dev.sh start

demo: start
	@cargo run --quiet --release -p sluice-client --example demo -- "$(SLUICE_TEST_DSN)"

# Every benchmark scenario against the project cluster (benches/README.md); results in
# target/bench/results.jsonl. For development: make bench BENCH_ARGS="--quick --scenario drain"
bench: start
	@cargo run --quiet --release -p sluice-benches -- --dsn "$(SLUICE_TEST_DSN)" $(BENCH_ARGS)

# pgrx's test run copies a debug build with test-only functions over the system's sluice.so
# (in place: a server that has it preloaded would crash), so the project cluster is stopped
# first, and the release build is installed after it.
test: deps
	@scripts/dev.sh stop
	@mkdir -p $(PGRX_TEST_DATA) && chown postgres:postgres $(PGRX_TEST_DATA)
	cd extension && cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_TEST_DATA)
	@scripts/dev.sh install
	@scripts/dev.sh start
	cargo test --no-fail-fast -p sluice-client
	cargo test --no-fail-fast -p sluice-tests

stop:
	@scripts/dev.sh stop

psql:
	@scripts/dev.sh psql
