# vmbox: see README.md. Everything builds as root on Debian 12.
SHELL := /bin/bash
PREFIX ?= /usr/local
SHARE_DIR ?= /usr/share/vmbox
CONFIG_DIR ?= /etc/vmbox
GUEST_OUT := build/guest
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/guest/vmbox-agent
export VMBOX_CACHE ?= /var/cache/vmbox

.PHONY: all build guest agent kernel initramfs install deps test unit-test fuzz vm-test e2e-test lint bench bench-net bench-vm soak quickstart clean cri-integration

all: build guest

build:
	cargo build --release --workspace --exclude vmbox-agent

# The agent is linked statically (glibc, libseccomp) so the initramfs needs nothing else.
# libseccomp-sys links the shared library unless told otherwise, which would silently give
# a dynamic binary: point it at a directory holding only libseccomp.a, then check.
agent:
	mkdir -p build/seccomp && cp /usr/lib/x86_64-linux-gnu/libseccomp.a build/seccomp/
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=$(abspath build/seccomp) \
	RUSTFLAGS='-C target-feature=+crt-static' \
	  cargo build --profile guest -p vmbox-agent --target $(AGENT_TARGET)
	@if readelf -d $(AGENT_BIN) | grep -q NEEDED || readelf -l $(AGENT_BIN) | grep -q INTERP; then \
	  echo "vmbox-agent is not static: check LIBSECCOMP_LINK_TYPE" >&2; exit 1; fi

kernel:
	guest/build-kernel.sh $(abspath $(GUEST_OUT))/vmlinux

initramfs: agent
	cargo run --release -q -p vmbox-guest --bin vmbox-initramfs -- $(abspath $(AGENT_BIN)) $(abspath $(GUEST_OUT))/initramfs.img

guest: kernel initramfs

install: build guest
	install -D -m 0755 target/release/containerd-shim-vmbox-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-vmbox-v2
	install -D -m 0644 $(GUEST_OUT)/vmlinux $(DESTDIR)$(SHARE_DIR)/vmlinux
	@# Configs installed by earlier versions name the kernel vmlinuz (a bzImage then).
	ln -sfn vmlinux $(DESTDIR)$(SHARE_DIR)/vmlinuz
	install -D -m 0644 $(GUEST_OUT)/initramfs.img $(DESTDIR)$(SHARE_DIR)/initramfs.img
	@if [ ! -f $(DESTDIR)$(CONFIG_DIR)/config.toml ]; then \
	  install -D -m 0644 config/vmbox.toml $(DESTDIR)$(CONFIG_DIR)/config.toml; fi

# Build and test dependencies of a fresh Debian 12 machine (root).
deps:
	.ci/deps.sh

unit-test:
	cargo test --workspace --exclude vmbox-tests

# cargo-fuzz targets of the host's parsers of guest bytes and of the OCI spec translation
# (docs/security.md), each for FUZZ_SECONDS from its committed corpus in fuzz/corpus/;
# a crash fails. RUSTC_BOOTSTRAP=1: cargo fuzz needs nightly flags and only the stable
# toolchain can be had here. Longer runs: make fuzz FUZZ_SECONDS=600.
FUZZ_SECONDS ?= 10
# --dev: a quarter of the release build's time (about 4 min cold on 2 cores), for CI; -O for long runs.
FUZZ_FLAGS ?= --dev
FUZZ_TARGETS := hello stream_header agent_replies qmp oci_spec
fuzz:
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run $(FUZZ_FLAGS) $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 2>&1 \
	    | grep -E '^#[0-9]+[[:space:]]+DONE|ERROR|SUMMARY|panicked|Test unit written' ; \
	  test $${PIPESTATUS[0]} -eq 0 || { echo "fuzz: $$t failed (artifact in fuzz/artifacts/$$t)"; exit 1; }; \
	done

# VM-level tests: real kernel, QEMU, agent and libcontainer. Slow under TCG.
vm-test: guest
	VMBOX_GUEST_DIR=$(abspath $(GUEST_OUT)) cargo test -p vmbox-tests --test vm -- --test-threads=1

# End-to-end through private containerds 1.6 (started and stopped here): ctr, and CRI
# (Kubernetes pods) with the project's own CRI client.
e2e-test: build guest
	VMBOX_GUEST_DIR=$(abspath $(GUEST_OUT)) VMBOX_SHIM_DIR=$(abspath target/release) \
	  cargo test -p vmbox-tests --test containerd --test network --test lifecycle --test parity --test cri -- --test-threads=1; \
	  rc=$$?; VMBOX_CTR_DIR=/run/vmbox-e2e tests/containerd/containerd.sh stop; \
	  VMBOX_CTR_CRI=1 VMBOX_CTR_DIR=/run/vmbox-cri tests/containerd/containerd.sh stop; exit $$rc

test: deps lint unit-test fuzz vm-test e2e-test

# containerd 1.6.20's own CRI integration tests against vmbox (docs/kubernetes.md has
# the results); not part of `make test`: its Go build and 30 pods take about 20 minutes.
cri-integration: build guest
	tests/cri-integration/run.sh

# A fresh Debian 12 machine to a container in a micro-VM: installs, starts a private
# containerd, imports a locally built busybox image, runs `uname -r` in the guest.
quickstart: deps install
	tests/containerd/containerd.sh start
	tests/containerd/build-image.sh build/busybox.tar docker.io/vmbox/busybox:latest
	ctr --address $$(tests/containerd/containerd.sh address) image import build/busybox.tar
	@echo "--- uname -r inside a vmbox micro-VM (the host runs $$(uname -r)):"
	ctr --address $$(tests/containerd/containerd.sh address) run --rm --runtime io.containerd.vmbox.v2 \
	  docker.io/vmbox/busybox:latest vmbox-quickstart-$$$$ uname -r

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# vmbox vs runc vs runsc through one private containerd (docs/benchmarks.md).
bench: build guest
	@command -v runsc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q runsc
	VMBOX_GUEST_DIR=$(abspath $(GUEST_OUT)) VMBOX_SHIM_DIR=$(abspath target/release) VMBOX_TEST_LOG=debug \
	  cargo run --release -q -p vmbox-tests --bin runtime-bench; \
	  rc=$$?; VMBOX_CTR_DIR=/run/vmbox-e2e VMBOX_SHIM_DIR=$(abspath target/release) tests/containerd/containerd.sh stop; exit $$rc

# Pod network throughput and latency, vmbox vs runc (docs/benchmarks.md).
bench-net: build guest
	VMBOX_GUEST_DIR=$(abspath $(GUEST_OUT)) VMBOX_SHIM_DIR=$(abspath target/release) \
	  cargo run --release -q -p vmbox-tests --bin net-bench; \
	  rc=$$?; VMBOX_CTR_DIR=/run/vmbox-e2e VMBOX_SHIM_DIR=$(abspath target/release) tests/containerd/containerd.sh stop; exit $$rc

# Leak and latency soak of the containerd path (docs/benchmarks.md).
soak: build guest
	VMBOX_GUEST_DIR=$(abspath $(GUEST_OUT)) VMBOX_SHIM_DIR=$(abspath target/release) \
	  cargo run --release -q -p vmbox-tests --bin soak-bench; \
	  rc=$$?; VMBOX_CTR_DIR=/run/vmbox-e2e VMBOX_SHIM_DIR=$(abspath target/release) tests/containerd/containerd.sh stop; exit $$rc

bench-vm: guest
	VMBOX_GUEST_DIR=$(abspath $(GUEST_OUT)) cargo run --release -q -p vmbox-tests --bin vmbox-bench

clean:
	cargo clean
	rm -rf build
