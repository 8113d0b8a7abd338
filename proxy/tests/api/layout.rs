//! The module layout docs/architecture.md promises: imports between the top-level modules of
//! `proxy/src` go one way (no cycles), so each layer can be read and changed on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its `use crate::…` lines name (tests excluded).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pending = vec![src.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let first = relative.components().next().unwrap().as_os_str().to_str().unwrap();
            let module = first.trim_end_matches(".rs").to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            let used = graph.entry(module.clone()).or_default();
            for line in code.lines().map(str::trim_start) {
                let Some(rest) = line.strip_prefix("use crate::").or_else(|| line.strip_prefix("pub use crate::"))
                else {
                    continue;
                };
                // `use crate::a::…`, or `use crate::{a, b::…}`.
                let names: Vec<&str> = match rest.strip_prefix('{') {
                    Some(list) => list.split(',').map(|n| n.trim().split("::").next().unwrap_or("")).collect(),
                    None => vec![rest.split("::").next().unwrap_or("")],
                };
                for name in names {
                    let name = name.trim_end_matches([';', '}']).trim();
                    if !name.is_empty() && name != module && name != "self" {
                        used.insert(name.to_owned());
                    }
                }
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one (depth-first).
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        start: &str,
    ) -> bool {
        let last = path.last().unwrap().clone();
        for next in graph.get(&last).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if done.insert(next.clone()) {
                path.push(next.clone());
                if visit(graph, path, done, start) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    visit(graph, &mut path, &mut BTreeSet::new(), start).then_some(path)
}

#[test]
fn imports_between_modules_go_one_way() {
    let graph = imports();
    assert!(graph.contains_key("token_service") && graph["token_service"].contains("cluster_flight"));
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}
