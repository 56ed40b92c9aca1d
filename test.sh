#!/usr/bin/env bash
# Run the whole test suite: build what the tests need (./setup.sh), check
# formatting and lints, then run every test, including the end-to-end suites
# that boot the real guest kernel under KVM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
log() { printf '[test] %s\n' "$*" >&2; }

./setup.sh
# The image tests start a docker-registry on 127.0.0.1 and push to it with
# skopeo; the isolation suite builds its outside network with ip(8); the
# upstream proxy tests start a tinyproxy on 127.0.0.1; the E2B suite runs the
# official e2b Python SDK from a virtual environment; the containerd shim's
# tests start a containerd of their own and drive it with ctr and with a CRI
# client, whose gRPC code is generated with protoc when it is built.
for pkg in docker-registry:/usr/bin/docker-registry skopeo:/usr/bin/skopeo iproute2:/usr/sbin/ip tinyproxy:/usr/bin/tinyproxy python3-venv:/usr/share/doc/python3-venv containerd:/usr/bin/containerd protobuf-compiler:/usr/bin/protoc; do
    [ -e "${pkg#*:}" ] && continue
    [ "$(id -u)" -eq 0 ] || { log "missing package ${pkg%%:*}; run: sudo apt-get install ${pkg%%:*}"; exit 1; }
    log "installing ${pkg%%:*}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkg%%:*}" >/dev/null
done
# The suite builds everything once: incremental caches would only double the
# disk the build needs.
export CARGO_INCREMENTAL=0
log "format"
cargo fmt --all --check
log "clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "tests"
# A test that boots a VM skips without /dev/kvm or the kernel in a plain
# `cargo test`; here that is a failure, so that a skip never counts as a pass.
export SANDBOX_REQUIRE_VM=1
cargo test --workspace --quiet --no-fail-fast -- --nocapture
