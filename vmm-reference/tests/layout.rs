// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VMM's structure stays readable: no import circle among the library's modules, and no
//! function over 80 lines without a `// Long:` comment saying why. Both read the sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FN_LINES: usize = 80;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src dir") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of a file without its comments and its unit tests.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The library's top-level modules (`src/X.rs` or `src/X/`), each with the modules it names
/// as `crate::Y`. The binary's own modules (`main.rs`, `cli/`) use the library from outside.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src()).expect("under src");
        let top = rel
            .components()
            .next()
            .expect("component")
            .as_os_str()
            .to_string_lossy();
        let module = top.trim_end_matches(".rs").to_string();
        if module == "main" || module == "lib" || module == "cli" {
            continue;
        }
        let text = code(&std::fs::read_to_string(&f).expect("read"));
        let deps = graph.entry(module.clone()).or_default();
        for part in text.split("crate::").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    let known: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    graph
}

/// A path from `to` back to `from` through `graph`, if there is one.
fn path_back(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![to.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("non-empty").clone();
        if last == from {
            return Some(path);
        }
        if !seen.insert(last.clone()) {
            continue;
        }
        for next in graph.get(&last).into_iter().flatten() {
            let mut p = path.clone();
            p.push(next.clone());
            stack.push(p);
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = module_graph();
    assert!(graph.len() > 10, "the scan found the modules: {graph:?}");
    let mut circles = Vec::new();
    for (m, deps) in &graph {
        for d in deps {
            if let Some(back) = path_back(&graph, m, d) {
                circles.push(format!("{m} -> {}", back.join(" -> ")));
            }
        }
    }
    assert!(circles.is_empty(), "import circles: {circles:#?}");
    // The graph, for whoever wants to see it: `cargo test --test layout -- --nocapture`.
    for (m, deps) in &graph {
        println!("{m} -> {}", deps.iter().cloned().collect::<Vec<_>>().join(" "));
    }
}

/// Functions (at any indentation) longer than the limit whose doc or attributes are not
/// preceded by a `// Long:` comment.
fn long_functions(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let is_fn = ["fn ", "pub fn ", "pub(crate) fn ", "pub(super) fn "]
            .iter()
            .any(|p| t.starts_with(p));
        if !is_fn || t.ends_with(';') {
            continue;
        }
        let indent = &l[..l.len() - t.len()];
        let close = format!("{indent}}}");
        let Some(end) = lines[i..].iter().position(|x| *x == close) else {
            continue;
        };
        let above = lines[..i]
            .iter()
            .rev()
            .take_while(|x| {
                let x = x.trim_start();
                x.starts_with("///") || x.starts_with("#[") || x.starts_with("//")
            })
            .any(|x| x.trim_start().starts_with("// Long:"));
        if end + 1 > MAX_FN_LINES && !above {
            let name = t
                .split("fn ")
                .nth(1)
                .unwrap_or("")
                .split(['(', '<'])
                .next()
                .unwrap_or("");
            long.push((name.to_string(), end + 1));
        }
    }
    long
}

#[test]
fn no_function_runs_over_80_lines_without_saying_why() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let mut long = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        for (name, n) in long_functions(&text) {
            long.push(format!("{}: {name} ({n} lines)", f.display()));
        }
    }
    assert!(
        long.is_empty(),
        "split these or say why with `// Long:`: {long:#?}"
    );
}

#[test]
fn the_checks_themselves_bite() {
    let body = "    let x = 1;\n".repeat(MAX_FN_LINES);
    let long = format!("fn big() {{\n{body}}}\n");
    assert_eq!(long_functions(&long), vec![("big".to_string(), MAX_FN_LINES + 2)]);
    assert!(long_functions(&format!("// Long: one table.\n{long}")).is_empty());
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert!(path_back(&g, "a", "b").is_some());
    assert_eq!(
        code("use crate::x; // crate::y\n#[cfg(test)]\ncrate::z"),
        "use crate::x; "
    );
}
