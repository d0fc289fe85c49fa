#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The full test suite: formatting, lints, docs, unit/property tests, KVM-level and end-to-end
# tests with the test guest, ACPI checks with ACPICA's iasl, and the Linux guest boot where
# hardware virtualization exists. Installs what it needs (Debian packages) when run as root.
#
# Fails if /dev/kvm is usable but the KVM tests did not all run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

say() { printf '\n==> %s\n' "$*"; }

# --- tools -----------------------------------------------------------------------------------
missing=()
command -v iasl >/dev/null 2>&1 || missing+=(acpica-tools)
command -v objdump >/dev/null 2>&1 || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "warning: cannot install ${missing[*]} (not root, no sudo); those tests will be skipped" >&2
    fi
fi
# Under CI a missing tool is a failure, not a skip.
if [ -n "${CI:-}" ] || { command -v iasl >/dev/null 2>&1 && command -v objdump >/dev/null 2>&1; }; then
    export VMM_REQUIRE_TOOLS=1
fi

# --- is KVM usable? (open /dev/kvm, KVM_GET_API_VERSION == 12, KVM_CREATE_VM succeeds) -------
kvm_usable=0
if python3 - <<'PY' 2>/dev/null
import fcntl, os
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
assert fcntl.ioctl(fd, 0xAE00) == 12
vm = fcntl.ioctl(fd, 0xAE01, 0)
os.close(vm); os.close(fd)
PY
then
    kvm_usable=1
    export VMM_REQUIRE_KVM=1
    ledger=$(mktemp)
    export KVM_TEST_LEDGER="$ledger"
    say "/dev/kvm is usable: KVM and end-to-end tests must run (VMM_REQUIRE_KVM=1)"
else
    say "/dev/kvm is not usable here: KVM and end-to-end tests will print SKIP"
fi

# --- static checks ---------------------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --all -- --check
rustfmt --edition 2021 --check crates/test-guest/kernel/main.rs

say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

say "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked

# --- tests -----------------------------------------------------------------------------------
say "cargo test --workspace (lapic-state's kvm feature is on here, via vmm-reference)"
cargo test --workspace --locked

say "cargo test -p lapic-state without the kvm feature"
cargo test -p lapic-state --locked

# rust-osdev's AML interpreter (acpi 6.1) needs unstable library features: its check lives in
# a crate outside the workspace, built with RUSTC_BOOTSTRAP=1 (as cargo-fuzz is).
say "AML evaluated by an independent interpreter (crates/acpi-cpu-hotplug/interp-check)"
CARGO_TARGET_DIR=target/interp-check RUSTC_BOOTSTRAP=1 \
    cargo test --manifest-path crates/acpi-cpu-hotplug/interp-check/Cargo.toml

if [ "$kvm_usable" = 1 ]; then
    # Every test that names itself to kvm_or_skip("...") must be in the ledger (a set check:
    # a count could hide a missing test behind one recorded under another name).
    expected=$(grep -rhoE 'kvm_or_skip\("[a-z0-9_]+"\)' vmm-reference/tests crates/*/tests 2>/dev/null \
        | sed -E 's/kvm_or_skip\("([a-z0-9_]+)"\)/\1/' | sort -u)
    not_run=$(comm -23 <(echo "$expected") <(sort -u "$ledger"))
    ran=$(sort -u "$ledger" | wc -l)
    rm -f "$ledger"
    if [ -z "$expected" ] || [ -n "$not_run" ]; then
        echo "error: /dev/kvm is usable but these KVM tests did not run: ${not_run:-<none found>}" >&2
        exit 1
    fi
    say "KVM tests that ran: $ran (all $(echo "$expected" | wc -l) named ones among them)"
fi

# --- fuzz smoke run (every cargo-fuzz target briefly) ----------------------------------------
say "fuzz smoke run (ci/fuzz-smoke.sh, ${FUZZ_SECONDS:-20}s per target)"
bash ci/fuzz-smoke.sh

# --- Linux guest (needs hardware virtualization; this project's PVM hosts cannot run it) ------
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ] && [ "$kvm_usable" = 1 ]; then
    say "hardware virtualization present: building and booting the Debian Linux guest"
    bash ci/linux-guest.sh
    cargo test -p vmm-reference --test linux_guest --locked -- --ignored
else
    say "SKIPPED: Linux guest boot (no vmx/svm in /proc/cpuinfo or a software KVM backend): not counted as passed"
fi

say "ci/test.sh: all checks passed in $(( $(date +%s) - start )) s"
