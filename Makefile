# sdp — common entry points. `make test` is the test command CI runs.
CARGO ?= cargo
SDP   := target/release/sdp

.PHONY: build test demo check-specs clean-results fmt lint bench

build:
	$(CARGO) build --release

# Tests: tiny models on synthetic data, CPU only, a few minutes on 2 cores; no ../shared needed.
test:
	$(CARGO) test --all-targets

# The demo: DP on the built-in `shapes` dataset with a small ResNet (~3 minutes on 2 cores).
demo: build
	$(SDP) run experiments/demo.toml

check-specs: build
	$(SDP) check experiments/*.toml

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --all-targets -- -D warnings

bench:
	$(CARGO) bench

clean-results:
	rm -rf results/*/
