#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Every KVM test on real upstream KVM: kvm-amd on Linux 6.1 and 6.12, each in a QEMU-TCG VM
# (ci/nested/run.py). The test binaries are built here (cargo test --no-run, the same build
# ci/test.sh uses) and executed in L1; each kernel's KVM test ledger must hold every test that
# names itself to kvm_or_skip("...") or linux_or_skip("...") (the Linux guest tests, which run
# here and not on PVM): the same set check as ci/test.sh, per kernel.
#
#   ci/nested/kvm-tests.sh [6.1] [6.12]     (default: both, side by side)
# Env: NESTED_TEST_TIMEOUT_S (default 600 per test), NESTED_TIMEOUT_S (default 1800 per L1),
# NESTED_IDLE_TIMEOUT_S (default 660, above the per-test bound: L1 silent that long is wedged;
# a fresh L1 resumes),
# NESTED_SMP (default 1 CPU per L1), NESTED_MEMORY_MIB (default 4096 per L1).
# Exit: 0 all passed; 1 a test failed or did not run; 2 QEMU or the kernels cannot be had.
set -euo pipefail
cd "$(dirname "$0")/../.."
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(6.1 6.12)
out="$PWD/target/nested/results"
mkdir -p "$out"

bash ci/nested/debs.sh || exit 2
# The Linux guest (Debian's cloud kernel + the busybox agent) that the linux_guest tests boot in L1.
# Its packages are the ones debs.sh just unpacked (bookworm's cloud kernel 6.1, busybox-static).
LINUX_GUEST_TREE="$PWD/target/nested/k6.1" LINUX_GUEST_BUSYBOX="$PWD/target/nested/busybox/bin/busybox" \
    bash ci/linux-guest.sh >"$out/linux-guest.log" 2>&1 || { tail -5 "$out/linux-guest.log" >&2; exit 1; }

# The test binaries that talk to /dev/kvm (each has a kvm_or_skip test), from cargo's JSON.
cargo test --workspace --locked --no-run --message-format=json 2>"$out/build.log" >"$out/build.json" \
    || { tail -20 "$out/build.log" >&2; exit 1; }
kvm_sources=$(grep -rlE '(kvm|linux)_or_skip\("' vmm-reference/tests crates/*/tests | xargs -n1 basename | sed 's/\.rs$//' | sort -u)
mapfile -t bins < <(python3 - "$out/build.json" $kvm_sources <<'PY'
import json, sys
want = set(sys.argv[2:])
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and "test" in m["target"]["kind"] and m["target"]["name"] in want:
        # manifest dir: cargo runs a test binary there
        print(m["executable"] + " " + m["manifest_path"].rsplit("/", 1)[0])
PY
)
# NESTED_ONLY (a regex on test binary names, e.g. "save_restore|e2e_snapshot") narrows a
# run for debugging; its ledger check then covers the tests of those binaries only.
# NESTED_FILTER (a regex on test names) narrows it further; the ledger check then fails.
if [ -n "${NESTED_ONLY:-}" ]; then
    mapfile -t bins < <(printf '%s\n' "${bins[@]}" | grep -E "/(${NESTED_ONLY})-[0-9a-f]+ ")
fi
[ ${#bins[@]} -gt 0 ] || { echo "nested: no KVM test binaries found" >&2; exit 1; }
vmm_bin="$PWD/target/debug/vmm-reference"
# Tests that do not pass in L1 yet, each with the finding that keeps it out. They are not
# run, they are reported on every run, and the set check below expects all the others.
declare -A known=(
)
# NESTED_RUN_KNOWN=1 runs them anyway (to work on them).
[ "${NESTED_RUN_KNOWN:-0}" = 1 ] && known=()
srcs=(vmm-reference/tests crates/*/tests)
if [ -n "${NESTED_ONLY:-}" ]; then
    mapfile -t srcs < <(ls vmm-reference/tests/*.rs crates/*/tests/*.rs | grep -E "/(${NESTED_ONLY})\.rs$")
fi
expected=$(grep -rhoE '(kvm|linux)_or_skip\("[a-z0-9_]+"\)' "${srcs[@]}" \
    | sed -E 's/(kvm|linux)_or_skip\("([a-z0-9_]+)"\)/\2/' | sort -u)
for t in "${!known[@]}"; do
    echo "nested: NOT RUN $t: ${known[$t]}" >&2
    expected=$(echo "$expected" | grep -vx "$t" || true)
done
skip_list=" ${!known[*]} "

# The L1 payload: each test of each binary on its own, from its package directory as cargo
# test runs it, under a per-test timeout (a hang costs one test, not the whole kernel's run).
payload='rc=0; failed=""
one() { # one EXE DIR TEST
    case "$NESTED_SKIP" in *" $3 "*) echo "nested-test NOT RUN $3"; return ;; esac
    [ -z "$NESTED_FILTER" ] || echo "$3" | grep -qE "$NESTED_FILTER" || return 0
    cd "$2"; t0=$(date +%s)
    timeout "${NESTED_TEST_TIMEOUT_S:-600}" "$1" --exact "$3" --test-threads=1 >/tmp/out 2>&1
    r=$?; t=$(( $(date +%s) - t0 ))
    if [ $r -eq 0 ]; then echo "nested-test ok $3 (${t} s)"; else
        cat /tmp/out; echo "nested-test FAILED $3 (exit $r, ${t} s)"; rc=1; failed="$failed $3"; fi
}
'
files=(--file "$vmm_bin" --file "$PWD/target/linux-guest/vmlinuz" --file "$PWD/target/linux-guest/initramfs.cpio.gz")
for b in "${bins[@]}"; do
    exe=${b%% *}; dir=${b#* }
    files+=(--file "$exe")
    payload+="mkdir -p '$dir'
for t in \$('$exe' --list --format terse 2>/dev/null | sed -n 's/: test\$//p'); do one '$exe' '$dir' \"\$t\"; done
"
done
payload+='[ -z "$failed" ] || echo "nested-test failures:$failed"
'
payload+='exit $rc'

# One kernel's run, resumed in a fresh L1 when QEMU's TCG wedges the old one (it can lose L1
# interrupts for good; run.py notices the silence): tests already reported are skipped, the
# one in progress runs again. A test that passed under VMM_REQUIRE_KVM=1 cannot have skipped,
# so a wedged L1's "ok" lines stand for its lost ledger. At most 3 L1s per kernel.
run_kernel() { # run_kernel KERNEL -> sets rc
    local k=$1 attempt done_list=" " log
    for attempt in 1 2 3; do
        log="$out/l1-$k-$attempt.log"
        set +e
        python3 ci/nested/run.py --kernel "$k" --smp "${NESTED_SMP:-1}" --memory-mib "${NESTED_MEMORY_MIB:-4096}" "${files[@]}" --timeout-s "${NESTED_TIMEOUT_S:-1800}" \
            --idle-timeout-s "${NESTED_IDLE_TIMEOUT_S:-660}" \
            --env KVM_TEST_LEDGER=/tmp/ledger --env VMM_REQUIRE_KVM=1 --env VMM_REQUIRE_LINUX=1 --env RUST_BACKTRACE=1 \
            --env VMM_SECCOMP="${VMM_SECCOMP:-kill}" \
            --env NESTED_TEST_TIMEOUT_S="${NESTED_TEST_TIMEOUT_S:-600}" \
            --env NESTED_SKIP="$skip_list$done_list" --env NESTED_FILTER="${NESTED_FILTER:-}" \
            --collect "/tmp/ledger=$ledger.$attempt" --log "$log" --monitor "$out/monitor-$k.sock" "$payload" \
            | grep --line-buffered -v "TCG doesn't support requested feature"
        rc=${PIPESTATUS[0]}
        set -e
        cat "$ledger.$attempt" >>"$ledger" 2>/dev/null || true
        [ "$rc" = 124 ] || [ "$rc" = 125 ] || return 0
        sed -n 's/^nested-test ok \([a-z0-9_]*\) .*/\1/p' "$log" >>"$ledger"
        done_list+="$(sed -n 's/^nested-test \(ok\|FAILED\) \([a-z0-9_]*\) .*/\2/p' "$log" | tr '\n' ' ')"
        if grep -q '^nested-test FAILED' "$log"; then rc=1; return 0; fi
        echo "nested $k: L1 $attempt wedged or died (exit $rc); resuming in a fresh L1" >&2
    done
}

# One kernel: its L1s, then its own ledger set check. Prints one result line; 0 when all passed.
one_kernel() { # one_kernel KERNEL
    local k=$1 start secs not_run ran
    start=$(date +%s)
    ledger="$out/ledger-$k"
    rm -f "$ledger" "$ledger".* "$out/result-$k"
    run_kernel "$k"
    secs=$(( $(date +%s) - start ))
    not_run=$(comm -23 <(echo "$expected") <( (sort -u "$ledger" 2>/dev/null || true) ))
    ran=$( (sort -u "$ledger" 2>/dev/null || true) | wc -l)
    if [ "$rc" -ne 0 ]; then
        echo "nested $k: FAILED (exit $rc) in $secs s; $ran KVM tests ran; logs $out/l1-$k-*.log" >&2
        return 1
    elif [ -n "$not_run" ]; then
        echo "nested $k: these KVM tests did not run: $(echo $not_run)" >&2
        return 1
    fi
    echo "nested $k: all $ran KVM tests passed on kvm-amd in $secs s" | tee "$out/result-$k"
}

# The kernels run side by side, each L1 on one emulated CPU: QEMU's multi-threaded TCG loses
# L1 wake-ups with -smp 2 (a CPU halts with work queued, then the whole L1 wedges); with one
# CPU per L1 it has no cross-CPU wake-up to lose, and two L1s still keep both host cores busy.
pids=()
for k in "${kernels[@]}"; do
    ( one_kernel "$k" ) 2>&1 | sed -u "s/^/[$k] /" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for k in "${kernels[@]}"; do
    grep -q "^nested $k: all" "$out/result-$k" 2>/dev/null || status=1
done
exit $status
