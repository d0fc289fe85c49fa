#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Check vmm-reference/api/openapi.yaml against a running VMM with schemathesis (PyPI, pinned,
# in target/ci-venv), so the spec and the server cannot drift apart. Every check runs
# (settings: vmm-reference/api/schemathesis.toml) on every operation but the three that end or
# copy the VM somewhere a generated URL says (vm.shutdown, vm.snapshot, vm.send-migration).
# Afterwards the VM must still run with no failed vCPU, and end cleanly on vm.shutdown.
# The API is a Unix socket; schemathesis speaks TCP: socat bridges the two on 127.0.0.1.
# Needs /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
version=4.32.5
venv=target/ci-venv
if ! "$venv/bin/st" --version 2>/dev/null | grep -qF "$version"; then
    bash ci/venv.sh "$venv"
    "$venv/bin/pip" install -q "schemathesis==$version"
fi
if ! command -v socat >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || { echo "error: ci/schemathesis.sh needs socat (apt-get install socat)" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends socat >/dev/null
fi
cargo build -q -p vmm-reference --locked
vmm=target/debug/vmm-reference

dir=$(mktemp -d)
vmm_pid="" shim_pid=""
fail() {
    echo "--- the VMM's stderr (last 30 lines) ---" >&2
    tail -30 "$dir/vmm.log" >&2 || true
    echo "error: $*" >&2
    exit 1
}
cleanup() {
    set +e
    [ -n "$shim_pid" ] && kill "$shim_pid" 2>/dev/null
    [ -n "$vmm_pid" ] && kill -9 "$vmm_pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
sock=$dir/api.sock
"$vmm" run --cpus boot=2,max=4 --memory 64M --api-socket "$sock" --serial null 2>"$dir/vmm.log" &
vmm_pid=$!
for _ in $(seq 300); do
    [ -S "$sock" ] && break
    kill -0 "$vmm_pid" 2>/dev/null || fail "the VMM ended before it made its API socket"
    sleep 0.1
done
[ -S "$sock" ] || fail "the VMM made no API socket in 30 s"
# socat listens on a port the kernel picks (port 0 is not an option for it): a free one is
# taken and handed over; if another process grabs it meanwhile, socat fails and we say so.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$sock" 2>"$dir/socat.log" &
shim_pid=$!
for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break
    kill -0 "$shim_pid" 2>/dev/null || { cat "$dir/socat.log" >&2; fail "socat could not listen on port $port"; }
    sleep 0.1
done

st_rc=0
"$venv/bin/st" --config-file vmm-reference/api/schemathesis.toml run vmm-reference/api/openapi.yaml \
    --url "http://127.0.0.1:$port/api/v1" --checks all \
    --exclude-operation-id vm.shutdown --exclude-operation-id vm.snapshot \
    --exclude-operation-id vm.send-migration \
    --report junit --report-dir target/schemathesis --no-color || st_rc=$?

# The VM survived what schemathesis sent: it runs (resumed if a generated request paused it),
# no vCPU thread failed, and vm.shutdown ends the VMM with status 0. ctl exits 75 on a 429
# (busy: a generated removal may still be under way), which is retried.
ctl() {
    local rc
    for _ in $(seq 10); do
        rc=0
        timeout 30 "$vmm" ctl --api-socket "$sock" "$@" || rc=$?
        [ "$rc" = 75 ] || return "$rc"
        sleep 1
    done
    return "$rc"
}
kill -0 "$vmm_pid" 2>/dev/null || fail "the VMM ended during the schemathesis run"
ctl resume >/dev/null || fail "vm.resume after schemathesis failed"
info=$(ctl info --json) || fail "vm.info after schemathesis failed"
echo "$info" | python3 -c '
import json, sys
i = json.load(sys.stdin)
assert i["state"] == "Running", i["state"]
assert not i["failed_vcpus"], i["failed_vcpus"]
print("after schemathesis: %s, %d of %d CPUs present" % (i["state"], i["present_vcpus"], i["max_vcpus"]))
' || fail "the VM is not well after schemathesis: $info"
ctl shutdown >/dev/null || fail "vm.shutdown failed"
if ! timeout 30 tail --pid="$vmm_pid" -f /dev/null; then
    fail "the VMM did not end within 30 s of vm.shutdown"
fi
vmm_rc=0
wait "$vmm_pid" || vmm_rc=$?
vmm_pid=""
[ "$vmm_rc" = 0 ] || fail "the VMM ended with status $vmm_rc after vm.shutdown"
[ "$st_rc" = 0 ] || { echo "error: schemathesis found the failures above (reports: target/schemathesis/)" >&2; exit 1; }
echo "schemathesis: no failures; the VM ran on and shut down cleanly"
