#!/usr/bin/env bash
# Run the whole test suite: build what the tests need (./setup.sh), check
# lints, then run every test, including the end-to-end suites that boot the
# real guest kernel under KVM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
log() { printf '[test] %s\n' "$*" >&2; }

./setup.sh
log "clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "tests"
cargo test --workspace --quiet -- --nocapture
