#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Line coverage of the four library crates by their own tests (unit, integration and, where
# /dev/kvm works, the KVM tests), measured with rustc's instrument-coverage and LLVM's
# profdata/cov tools of the LLVM version rustc uses (Debian's llvm-N package), per crate,
# against the floors in ci/coverage-floor.txt.
#
#   bash ci/coverage.sh     print the table (target/coverage/summary.txt); fail below a floor
#
# Only the crates' src/ counts (not their tests, benches or examples, nor dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=target/coverage
crates=(lapic-state acpi-cpu-hotplug vcpu-manager vm-live-migration)

# LLVM's tools must read the profiles this rustc writes: same major version.
major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
tool() { command -v "$1-$major" || command -v "/usr/lib/llvm-$major/bin/$1" || true; }
if [ -z "$(tool llvm-profdata)" ] || [ -z "$(tool llvm-cov)" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "llvm-$major" >/dev/null
    elif [ -n "${CI:-}" ]; then
        echo "coverage: llvm-$major is not installed and this is not root" >&2
        exit 1
    else
        echo "SKIP coverage: install llvm-$major (LLVM of rustc $(rustc -V | cut -d' ' -f2))" >&2
        exit 0
    fi
fi
profdata=$(tool llvm-profdata)
cov=$(tool llvm-cov)

rm -rf "$out/prof"
mkdir -p "$out/prof"
export CARGO_TARGET_DIR="$out/target"
export RUSTFLAGS="-C instrument-coverage"
export LLVM_PROFILE_FILE="$root/$out/prof/%p-%m.profraw"
pkgs=()
for c in "${crates[@]}"; do pkgs+=(-p "$c"); done
cargo test "${pkgs[@]}" --all-features --locked --tests -q >"$out/test.log" 2>&1 \
    || { tail -40 "$out/test.log" >&2; echo "coverage: the instrumented tests failed" >&2; exit 1; }
# The test executables (each is an -object for llvm-cov).
objects=$(cargo test "${pkgs[@]}" --all-features --locked --tests --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
"$profdata" merge -sparse "$out"/prof/*.profraw -o "$out/all.profdata"
args=()
for o in $objects; do args+=(-object "$o"); done
"$cov" export -summary-only -instr-profile="$out/all.profdata" "${args[@]}" \
    -ignore-filename-regex='(\.cargo/registry|/rustc/|/tests/|/benches/|/examples/|/target/)' \
    >"$out/export.json"

python3 - "$out/export.json" ci/coverage-floor.txt "$out/summary.txt" "${crates[@]}" <<'PY'
import json, sys
export, floors_path, summary, crates = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
files = json.load(open(export))["data"][0]["files"]
floors = {}
for line in open(floors_path):
    line = line.split("#")[0].split()
    if len(line) == 2:
        floors[line[0]] = float(line[1])
rows, failed = [], []
for c in crates:
    mine = [f for f in files if f"/crates/{c}/src/" in f["filename"]]
    lines = sum(f["summary"]["lines"]["count"] for f in mine)
    hit = sum(f["summary"]["lines"]["covered"] for f in mine)
    fns = sum(f["summary"]["functions"]["count"] for f in mine)
    fhit = sum(f["summary"]["functions"]["covered"] for f in mine)
    pct = 100.0 * hit / lines if lines else 0.0
    floor = floors.get(c, 0.0)
    rows.append(f"{c:<20} {pct:6.1f} % of {lines:5d} lines  {100.0 * fhit / max(fns, 1):6.1f} % of {fns:4d} functions  (floor {floor:.0f} %)")
    if pct < floor:
        failed.append(f"{c}: {pct:.1f} % < floor {floor:.0f} %")
text = "\n".join(["crate                 lines covered               functions covered", *rows])
open(summary, "w").write(text + "\n")
print(text)
if failed:
    print("coverage below the floor: " + "; ".join(failed), file=sys.stderr)
    sys.exit(1)
PY
