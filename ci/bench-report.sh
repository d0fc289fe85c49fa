#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The benchmarks' pictures, checked as people see them. Runs the boot, hotplug and migration
# benchmarks briefly, QEMU beside us (ci/qemu-peer.sh); they write their tables and SVG plots
# under target/bench-report/ with an index.html. Then headless Chromium (Debian's package)
# opens the index and every plot, and the check fails when a screenshot is blank or a plot
# lacks a series: every plot must show our colour, and the latency plots QEMU's too.
#
#   bash ci/bench-report.sh
# Env: BENCH_PROFILE (default bench, i.e. release; CI uses dev to reuse the test build: its
# numbers are then not for comparing, and the report says so), and the benchmarks' sample
# counts (BOOT_BENCH_RUNS, HOTPLUG_BENCH_SAMPLES, MIGRATION_BENCH_SAMPLES; 5, 5, 1 here).
# Needs /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
report="$PWD/target/bench-report"
profile="${BENCH_PROFILE:-bench}"
apt_install() {
    [ "$(id -u)" -eq 0 ] || { echo "error: ci/bench-report.sh needs $* (apt-get install $*)" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v chromium >/dev/null 2>&1 || apt_install chromium
venv=target/ci-venv
"$venv/bin/python" -c 'import PIL' 2>/dev/null || {
    bash ci/venv.sh "$venv"
    "$venv/bin/pip" install -q "pillow==13.0.0"
}
bash ci/qemu-peer.sh >/dev/null

rm -rf "$report"
mkdir -p "$report"
printf 'Built with the %s profile on %s, %s.%s\n' "$profile" "$(uname -r)" "$(date -u +%F)" \
    "$([ "$profile" = bench ] || echo ' Not the release build: the numbers show the plots work, not how fast anything is.')" \
    >"$report/about.txt"
BOOT_BENCH_RUNS="${BOOT_BENCH_RUNS:-5}" HOTPLUG_BENCH_SAMPLES="${HOTPLUG_BENCH_SAMPLES:-5}" \
MIGRATION_BENCH_SAMPLES="${MIGRATION_BENCH_SAMPLES:-1}" BENCH_REPORT_DIR="$report" \
    cargo bench -q -p vmm-reference --locked --profile "$profile" --bench boot --bench hotplug --bench migration

shots="$report/screenshots"
mkdir -p "$shots"
shoot() { # file, width, height
    local log="$shots/$(basename "$1").log"
    timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
        --window-size="$2,$3" --screenshot="$shots/$(basename "$1").png" "file://$1" >"$log" 2>&1 || {
        tail -5 "$log" >&2
        echo "error: headless Chromium could not screenshot $1" >&2
        exit 1
    }
}
shoot "$report/index.html" 1000 3000
for svg in "$report"/*.svg; do shoot "$svg" 760 480; done
"$venv/bin/python" - "$report" <<'PY'
import pathlib, sys
from PIL import Image
report = pathlib.Path(sys.argv[1])
OURS, QEMU = (0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)
def near(p, c):
    return sum(abs(a - b) for a, b in zip(p[:3], c)) < 40
def check(png, colours, plot_top=0):
    img = Image.open(png).convert("RGB")
    px = list(img.get_flattened_data())
    ink = sum(1 for p in px if sum(p) < 3 * 235)
    distinct = len(set(px))
    problems = []
    if ink < 0.01 * len(px) or distinct < 3:
        problems.append(f"blank ({ink} of {len(px)} pixels drawn, {distinct} colours)")
    # A series counts only where it is drawn: below the legend, whose swatches (140 pixels
    # each) are in the series colours too.
    w = img.width
    below = px[plot_top * w:]
    for name, c in colours:
        if sum(1 for p in below if near(p, c)) < 120:
            problems.append(f"no {name} series drawn")
    return problems
# The plot area starts below the title (40 px) and one 18 px legend row per series.
def plot_top(n_series):
    return 40 + 18 * n_series + 8
svgs = sorted(report.glob("*.svg"))
expected = {"boot-ready", "hotplug-add", "hotplug-remove", "migration-rounds-bytes", "migration-rounds-dirty"}
failed = [f"missing plot {n}.svg" for n in sorted(expected - {s.stem for s in svgs})]
# QEMU's series is required where its benchmark's table says the QEMU peer ran.
def qemu_ran(bench):
    t = (report / f"{bench}.txt").read_text() if (report / f"{bench}.txt").exists() else ""
    return "QEMU 7.2" in t and "QEMU peer failed" not in t and "no QEMU" not in t
for svg in svgs:
    colours = [("vmm-reference", OURS)]
    if svg.stem in ("boot-ready", "hotplug-add", "hotplug-remove") and qemu_ran(svg.stem.split("-")[0]):
        colours.append(("QEMU", QEMU))
    top = plot_top(len(colours))
    failed += [f"{svg.name}: {p}" for p in check(report / "screenshots" / f"{svg.name}.png", colours, top)]
failed += [f"index.html: {p}" for p in check(report / "screenshots" / "index.html.png", [("vmm-reference", OURS)])]
for f in failed:
    print("error:", f, file=sys.stderr)
if failed:
    sys.exit(1)
print(f"bench report: {len(svgs)} plots and the index render (screenshots in {report}/screenshots)")
PY
