// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The benchmarks' pictures: SVG plots and the tables they printed, under
//! `target/bench-report/` (or `$BENCH_REPORT_DIR`), with an `index.html` that shows them all.
//!
//! Written by hand rather than with a plotting crate: plotters, for one, lays out text with
//! font metrics and so needs a font backend (font-kit with the system's freetype and
//! fontconfig, or a TTF bundled in); these charts leave text to the browser in `<text>`
//! elements, and two chart kinds are all the benchmarks draw.

use std::fmt::Write as _;
use std::path::PathBuf;

/// One data series of a chart.
pub struct Series<'a> {
    /// Legend name.
    pub name: &'a str,
    /// Values (ECDF: samples; bars: one per category).
    pub values: &'a [f64],
}

/// Series colours, in order: ours first, the peer second.
const COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];
const W: f64 = 760.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 24.0;
/// Title, then one legend row per series, then the plot.
const TITLE: f64 = 40.0;
const LEGEND_ROW: f64 = 18.0;
const PLOT_H: f64 = 320.0;
const BOTTOM: f64 = 56.0;

/// Where the report goes.
pub fn dir() -> PathBuf {
    match std::env::var_os("BENCH_REPORT_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("target/bench-report"),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Tick positions from 0 (or `lo`) up past `hi`: steps of 1, 2 or 5 times a power of ten.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    (0..=8)
        .map(|i| first + step * i as f64)
        .take_while(|t| *t <= hi + step * 0.999)
        .collect()
}

/// A tick or legend number: no decimals for whole numbers, else up to three, trailing zeros
/// dropped.
fn label(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        return format!("{v:.0}");
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The frame of a chart: title, legend rows, axes with ticks and labels. `x`/`y` are the
/// data ranges the axes span.
struct Frame {
    out: String,
    x: (f64, f64),
    y: (f64, f64),
    /// Top of the plot area (below the legend).
    top: f64,
}

impl Frame {
    fn new(title: &str, labels: (&str, &str), legend: &[String], x: (f64, f64), y: (f64, f64)) -> Frame {
        let (x_label, y_label) = labels;
        let top = TITLE + LEGEND_ROW * legend.len() as f64 + 8.0;
        let h = top + PLOT_H + BOTTOM;
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"{W}\" height=\"{h}\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
            W / 2.0,
            esc(title)
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">{}</text>",
            LEFT + (W - LEFT - RIGHT) / 2.0,
            h - 12.0,
            esc(x_label),
            top + PLOT_H / 2.0,
            top + PLOT_H / 2.0,
            esc(y_label)
        );
        let mut f = Frame { out, x, y, top };
        f.legend(legend);
        f
    }

    /// Bottom of the plot area.
    fn base(&self) -> f64 {
        self.top + PLOT_H
    }

    fn px(&self, v: f64) -> f64 {
        LEFT + (v - self.x.0) / (self.x.1 - self.x.0).max(f64::MIN_POSITIVE) * (W - LEFT - RIGHT)
    }

    fn py(&self, v: f64) -> f64 {
        self.base() - (v - self.y.0) / (self.y.1 - self.y.0).max(f64::MIN_POSITIVE) * PLOT_H
    }

    /// Axes, grid lines at the y ticks, and x ticks at `xt` when given.
    fn axes(&mut self, yt: &[f64], xt: Option<&[f64]>) {
        for &t in yt {
            let y = self.py(t);
            let _ = writeln!(
                self.out,
                "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                W - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                label(t)
            );
        }
        for &t in xt.unwrap_or(&[]) {
            let x = self.px(t);
            let _ = writeln!(
                self.out,
                "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#333\"/>\
                 <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                self.base(),
                self.base() + 5.0,
                self.base() + 18.0,
                label(t)
            );
        }
        let _ = writeln!(
            self.out,
            "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>\
             <line x1=\"{LEFT}\" y1=\"{}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"#333\"/>",
            self.base(),
            W - RIGHT,
            self.base(),
            self.top,
            self.base()
        );
    }

    fn legend(&mut self, names: &[String]) {
        for (i, n) in names.iter().enumerate() {
            let y = TITLE + LEGEND_ROW * i as f64;
            let _ = writeln!(
                self.out,
                "<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"10\" fill=\"{}\"/>\
                 <text x=\"{}\" y=\"{}\">{}</text>",
                LEFT + 12.0,
                y,
                COLORS[i % COLORS.len()],
                LEFT + 32.0,
                y + 9.5,
                esc(n)
            );
        }
    }

    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// An empirical distribution per series: for each value x, the share of samples at or below
/// it (a step line), so the medians and the tails of two systems can be read side by side.
pub fn ecdf(title: &str, x_label: &str, series: &[Series]) -> String {
    let sorted: Vec<Vec<f64>> = series
        .iter()
        .map(|s| {
            let mut v: Vec<f64> = s.values.iter().copied().filter(|v| v.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    let hi = sorted
        .iter()
        .filter_map(|v| v.last())
        .fold(0.0f64, |a, b| a.max(*b));
    let xt = ticks(0.0, hi);
    let x_hi = xt.last().copied().unwrap_or(1.0).max(hi);
    let names: Vec<String> = series
        .iter()
        .zip(&sorted)
        .map(|(s, v)| match v.get(v.len() / 2) {
            Some(m) => format!("{} (n={}, median {})", s.name, v.len(), label(*m)),
            None => format!("{} (no samples)", s.name),
        })
        .collect();
    let labels = (x_label, "share of samples at or below");
    let mut f = Frame::new(title, labels, &names, (0.0, x_hi), (0.0, 1.0));
    f.axes(&[0.0, 0.25, 0.5, 0.75, 1.0], Some(&xt));
    for (i, v) in sorted.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
        let n = v.len() as f64;
        let mut pts = format!("{:.1},{:.1}", f.px(v[0]), f.py(0.0));
        for (k, x) in v.iter().enumerate() {
            let (x, lo, hi) = (f.px(*x), f.py(k as f64 / n), f.py((k + 1) as f64 / n));
            let _ = write!(pts, " {x:.1},{lo:.1} {x:.1},{hi:.1}");
        }
        let _ = writeln!(
            f.out,
            "<polyline points=\"{pts}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2.5\"/>",
            COLORS[i % COLORS.len()]
        );
    }
    f.finish()
}

/// Grouped bars: one group per category (labelled below), one bar per series.
pub fn bars(title: &str, labels: (&str, &str), categories: &[String], series: &[Series]) -> String {
    let hi = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let yt = ticks(0.0, hi);
    let y_hi = yt.last().copied().unwrap_or(1.0).max(hi);
    let groups = categories.len().max(1) as f64;
    let names: Vec<String> = series.iter().map(|s| s.name.to_string()).collect();
    let mut f = Frame::new(title, labels, &names, (0.0, groups), (0.0, y_hi));
    f.axes(&yt, None);
    let width = 0.8 / series.len().max(1) as f64;
    for (g, c) in categories.iter().enumerate() {
        let (x, y) = (f.px(g as f64 + 0.5), f.base() + 18.0);
        let _ = writeln!(
            f.out,
            "<text x=\"{x:.1}\" y=\"{y}\" text-anchor=\"middle\">{}</text>",
            esc(c)
        );
        for (i, s) in series.iter().enumerate() {
            let v = s.values.get(g).copied().filter(|v| v.is_finite()).unwrap_or(0.0);
            let x0 = f.px(g as f64 + 0.1 + width * i as f64);
            let x1 = f.px(g as f64 + 0.1 + width * (i + 1) as f64);
            let (top, base) = (f.py(v), f.py(0.0));
            let _ = writeln!(
                f.out,
                "<rect x=\"{x0:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                (x1 - x0 - 1.0).max(1.0),
                base - top,
                COLORS[i % COLORS.len()]
            );
        }
    }
    f.finish()
}

/// Write `<name>.svg` (or `<name>.txt` for a table) into the report and refresh the index.
/// A report that cannot be written is said on stderr; the benchmark's numbers stand.
pub fn save(name: &str, ext: &str, content: &str) {
    let d = dir();
    let written = std::fs::create_dir_all(&d)
        .and_then(|_| std::fs::write(d.join(format!("{name}.{ext}")), content))
        .and_then(|_| write_index(&d));
    match written {
        Ok(()) => eprintln!("bench report: {}", d.join(format!("{name}.{ext}")).display()),
        Err(e) => eprintln!("bench report: {}: {e}", d.display()),
    }
}

/// `index.html`: every table (as text) and every plot in the report, by name.
fn write_index(d: &std::path::Path) -> std::io::Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(d)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".svg") || n.ends_with(".txt"))
        .collect();
    // Per benchmark (the name up to its first '-' or '.'): the table, then its plots.
    names.sort_by_key(|n| {
        let bench = n.split(['-', '.']).next().unwrap_or("").to_string();
        (bench, n.ends_with(".svg"), n.clone())
    });
    let mut html = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>vmm-reference benchmarks</title>\n\
         <style>body{font-family:sans-serif;margin:24px;background:#fafafa}img{background:white;border:1px solid #ccc;margin:8px 8px 8px 0}pre{background:white;border:1px solid #ccc;padding:8px}</style>\n\
         </head><body><h1>vmm-reference benchmarks</h1>\n",
    );
    for n in &names {
        let _ = writeln!(html, "<h2>{}</h2>", esc(n));
        if let Some(stem) = n.strip_suffix(".txt") {
            let text = std::fs::read_to_string(d.join(n)).unwrap_or_default();
            let _ = writeln!(html, "<pre id=\"{}\">{}</pre>", esc(stem), esc(&text));
        } else {
            let _ = writeln!(html, "<img src=\"{}\" alt=\"{}\">", esc(n), esc(n));
        }
    }
    html.push_str("</body></html>\n");
    std::fs::write(d.join("index.html"), html)
}
