# negmine: the two commands of the quick start, and their parts.
#   make demo    build, start a server on generated data, mine negatives, stop
#   make test    build and run every test
#   make python  the Python package, installed into $(BUILD_DIR)/venv
#   make wordnet the WordNet training experiment (examples/wordnet)
# Each target installs missing Debian packages first (make deps).

BUILD_DIR ?= build
BUILD_TYPE ?= RelWithDebInfo
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
# Where the demo server keeps its data, and its port.
DEMO_DIR ?= demo-data
DEMO_PORT ?= 50061

# Debian packages needed to build, test and demo negmine.
DEB_PACKAGES := build-essential cmake ninja-build pkg-config \
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
  libeigen3-dev libabsl-dev prometheus-cpp-dev \
  libgtest-dev libgmock-dev libbenchmark-dev \
  python3 python3-grpcio python3-protobuf python3-numpy \
  libfaiss-dev libhnswlib-dev prometheus python3-yaml openssl clang \
  python3-torch python3-venv python3-setuptools python3-wheel python3-matplotlib wordnet-base
# Only for `make bench`: a real BLAS for the peers, and the plots.
BENCH_PACKAGES := libopenblas0-pthread python3-matplotlib

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps bench-deps install-missing configure build test demo bench bench-smoke gpu-bundle clean \
  python wordnet soak image-test

all: build

# Installs only what is missing; silent when everything is there.
deps:
	@$(MAKE) --no-print-directory install-missing PACKAGES="$(DEB_PACKAGES)"

bench-deps: deps
	@$(MAKE) --no-print-directory install-missing PACKAGES="$(BENCH_PACKAGES)"

install-missing:
	@missing=$$(for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BUILD_DIR)/build.ninja: CMakeLists.txt | deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_FLAGS)

configure: $(BUILD_DIR)/build.ninja

build: deps configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

# The Python package (client/python): a venv made with Debian's python3 and
# its system packages, the package installed into it (also part of `build`).
python: deps configure
	cmake --build $(BUILD_DIR) --target negmine_python

# The WordNet experiment: every arm, the table and the plot in
# examples/wordnet/results.
wordnet: build
	$(BUILD_DIR)/venv/bin/python examples/wordnet/run.py \
	  --server-bin $(BUILD_DIR)/server/negmine-server --out-dir examples/wordnet/results

# The server on an embedded default (CPU, a fresh local data dir, 100k drift-bench
# targets with d = 64), then the CLI mines top-k, sampled and mixed negatives
# for a few queries, applies a simulated drift update (the landmarks
# re-encoded at step 20), mines again, then stops the server with SIGTERM.
demo: build
	@set -e; \
	srv=$(BUILD_DIR)/server/negmine-server; cli=$(BUILD_DIR)/client/negmine; \
	rm -rf $(DEMO_DIR); mkdir -p $(DEMO_DIR); \
	$$srv --listen=127.0.0.1:$(DEMO_PORT) --data_dir=$(DEMO_DIR) --metrics_listen= \
	  --port_file=$(DEMO_DIR)/port --default_dim=64 --generate_targets=100000 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null' EXIT; \
	for i in $$(seq 600); do [ -s $(DEMO_DIR)/port ] && break; \
	  kill -0 $$pid 2>/dev/null || { echo "demo: the server failed to start"; exit 1; }; sleep 0.1; done; \
	nm="$$cli --server 127.0.0.1:$(DEMO_PORT)"; \
	echo; echo "== negmine info"; $$nm info; \
	echo; echo "== top-10 hardest negatives for 2 queries"; \
	$$nm mine --collection default --random-queries 2 --seed 1 --k 10 --mode topk; \
	echo; echo "== 8 samples from the softmax at temperature 0.05 (with log q)"; \
	$$nm mine --collection default --random-queries 2 --seed 1 --k 8 --mode sample --temperature 0.05 --sample-seed 1; \
	echo; echo "== mixed: the top 4, then 4 samples from the rest, skipping the top 2 ranks"; \
	$$nm mine --collection default --random-queries 1 --seed 1 --k 8 --mode mixed --num-hard 4 --rank-offset 2 --temperature 0.05 --sample-seed 1; \
	echo; echo "== the trainer's model moved to step 20: it re-encodes only the landmarks, and the index corrects all targets"; \
	$$nm landmarks --collection default; \
	$$nm drift --collection default --model-step 20 --simulate --seed 1; \
	echo; echo "== top-10 again, now from the corrected embeddings"; \
	$$nm mine --collection default --random-queries 1 --seed 1 --k 10 --mode topk; \
	kill -TERM $$pid; wait $$pid; trap - EXIT; echo; echo "demo: done, server stopped"

# The drift bench at the default size (N = 1M, d = 128, batches of 4096, k = 64,
# 2 threads) against FAISS and hnswlib; results in bench/results/. OpenBLAS's
# safety pins of this machine are lifted for this command only.
BENCH_FLAGS ?= --n=1000000 --dim=128 --queries=4096 --k=64 --threads=2
bench: bench-deps build
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BUILD_DIR)/bench/negmine-bench $(BENCH_FLAGS) \
	  --server_bin=$(BUILD_DIR)/server/negmine-server --out_dir=bench/results \
	  --flags_note="$(BUILD_TYPE), -march=x86-64-v3 (negmine); Debian libfaiss 1.7.3 + OpenBLAS pthread; hnswlib 0.6.2"
	/usr/bin/python3 bench/plot.py bench/results/results.json

# A tiny run of the same harness (also part of `make test`).
bench-smoke: build
	cd $(BUILD_DIR) && ctest -R bench_smoke --output-on-failure

# The long crash test: 1,000 SIGKILLs during writes, snapshots and recovery;
# every acknowledged write survives, no refused write is ever visible (about
# an hour on 2 cores; `make test` runs a bounded version).
soak: build
	/usr/bin/python3 tests/crash_test.py --server-bin $(BUILD_DIR)/server/negmine-server \
	  --proto-python $(BUILD_DIR)/proto/python --soak --kills 1000 --seed 7

# The container image built for real (podman, no daemon) and run from its
# filesystem in a chroot: health, metrics, the demo trainer. Root; opt-in:
# 10-30 min on 2 cores, since it compiles the server and the CLI in the image.
image-test:
	JOBS=$(JOBS) nice bash deploy/image_test.sh

# The CUDA parity tests and bench, with the abseil libraries they link, in
# .gpu/ (git-ignored): copy it to a GPU machine and run .gpu/gpu_run.sh.
gpu-bundle: build
	@test -x $(BUILD_DIR)/bench/negmine-cuda-bench || { echo "the CUDA backend is not built (no nvcc?)"; exit 1; }
	rm -rf .gpu && mkdir -p .gpu/lib
	cp $(BUILD_DIR)/tests/cuda_parity_test $(BUILD_DIR)/bench/negmine-cuda-bench bench/gpu_run.sh .gpu/
	strip .gpu/cuda_parity_test .gpu/negmine-cuda-bench
	ldd .gpu/cuda_parity_test .gpu/negmine-cuda-bench | awk '/libabsl/ {print $$3}' | sort -u | xargs -I{} cp -L {} .gpu/lib/

clean:
	rm -rf $(BUILD_DIR) $(DEMO_DIR)
