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

# Real images, offline: CIFAR-10 as JPEG (lossy, q≈75) from ../shared/datasets, extracted outside the repo.
# Label results on it `cifar10-jpeg-q75`, never `cifar10`. Not part of `make test`.
CIFAR10_JPEG_TGZ ?= ../shared/datasets/cifar10-jpeg-q75.tar.gz
CIFAR10_JPEG_DIR := /tmp/cifar10-jpeg

.PHONY: cifar10-jpeg demo-cifar10-jpeg

cifar10-jpeg:
	@if [ -d $(CIFAR10_JPEG_DIR)/train ] && [ -d $(CIFAR10_JPEG_DIR)/test ]; then \
		echo "$(CIFAR10_JPEG_DIR) exists"; \
	else \
		mkdir -p $(CIFAR10_JPEG_DIR).part && tar -xzf $(CIFAR10_JPEG_TGZ) -C $(CIFAR10_JPEG_DIR).part && \
		mv $(CIFAR10_JPEG_DIR).part $(CIFAR10_JPEG_DIR); \
	fi

# DP (K = 2) with a small ResNet on all of cifar10-jpeg-q75 (~6 minutes on 2 cores).
demo-cifar10-jpeg: build cifar10-jpeg
	$(SDP) data info folder:$(CIFAR10_JPEG_DIR)
	$(SDP) run experiments/cifar10_jpeg_demo.toml
