#!/usr/bin/env bash
# Install what is missing and build everything a sandbox needs:
# the guest kernel, the default guest image, the `sandbox` CLI and
# `sandbox-holder` (the holder program applications embedding the library use).
# Built artefacts are cached in $SANDBOX_CACHE (default ~/.cache/sandbox),
# so a second run takes seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
log() { printf '[setup] %s\n' "$*" >&2; }

[ -e /dev/kvm ] || log "warning: /dev/kvm does not exist; sandboxes need KVM (load kvm_intel or kvm_amd, or enable nested virtualisation)"

kernel-config/build.sh >/dev/null
rootfs/build-default.sh >/dev/null
log "building the sandbox CLI and sandbox-holder"
cargo build --quiet --release -p cli --bin sandbox
cargo build --quiet --release -p sandbox --bin sandbox-holder
log "ready: ${CARGO_TARGET_DIR:-$(pwd)/target}/release/sandbox (and sandbox-holder beside it)"
