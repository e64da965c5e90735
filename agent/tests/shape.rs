//! The shape the code promises: one definition per program, map and counter
//! (the contract crate's tables) that the built kernel object agrees with,
//! and agent modules that do not import each other in a cycle.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use meshlane_common::{maps, programs};

fn object() -> Vec<u8> {
    meshlane::bpf::object_bytes(None).expect(
        "the agent was built without its eBPF object: run `cargo xtask build-ebpf` (cargo xtask test does) and rebuild",
    )
}

#[test]
fn the_object_has_exactly_the_programs_of_the_table() {
    let obj = aya_obj::Object::parse(&object()).expect("parse the eBPF object");
    let in_object: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
    let in_table: BTreeSet<&str> = programs::ALL.iter().map(|p| p.name).collect();
    assert_eq!(
        in_object, in_table,
        "ebpf/programs and meshlane_common::programs::ALL name different programs"
    );
    for p in programs::ALL {
        let section = &obj.programs[p.name].section;
        assert_eq!(
            meshlane::probe::section_hook(section),
            Some(p.hook),
            "program {}: the table says {}, the object's section is {section:?}",
            p.name,
            p.hook.section()
        );
    }
}

#[test]
fn the_object_has_exactly_the_maps_of_the_table_with_their_layout() {
    let obj = aya_obj::Object::parse(&object()).expect("parse the eBPF object");
    let in_object: BTreeSet<&str> = obj
        .maps
        .keys()
        .map(String::as_str)
        .filter(|n| !n.starts_with('.'))
        .collect();
    let in_table: BTreeSet<&str> = maps::ALL.iter().map(|m| m.name).collect();
    assert_eq!(
        in_object, in_table,
        "ebpf/programs/src/maps.rs and meshlane_common::maps::ALL name different maps"
    );
    for m in maps::ALL {
        let d = &obj.maps[m.name];
        assert_eq!(d.map_type(), m.kind.map_type(), "map {}: type", m.name);
        assert_eq!(d.key_size(), m.key_size, "map {}: key size", m.name);
        if m.kind != maps::Kind::SockHash {
            assert_eq!(d.value_size(), m.value_size, "map {}: value size", m.name);
        }
        if m.kind != maps::Kind::SkStorage {
            assert_eq!(d.max_entries(), m.capacity, "map {}: capacity", m.name);
        }
    }
}

/// `use crate::a::...` and `crate::a::` paths in every file of module `a`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    fn files(p: &Path, out: &mut Vec<PathBuf>) {
        if p.is_dir() {
            for e in fs::read_dir(p).expect("read dir").flatten() {
                files(&e.path(), out);
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p.to_path_buf());
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in fs::read_dir(src).expect("read agent/src").flatten() {
        let path = e.path();
        let module = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name")
            .to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let mut fs_ = Vec::new();
        files(&path, &mut fs_);
        let deps = graph.entry(module.clone()).or_default();
        for f in fs_ {
            let text = fs::read_to_string(&f).expect("read source");
            // A `use crate::{a, b::c}` group names several modules.
            let mut rest = text.as_str();
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                    let end = group.find("};").unwrap_or(group.len());
                    group[..end]
                        .split(',')
                        .map(|s| s.trim().split("::").next().unwrap_or(""))
                        .collect()
                } else {
                    vec![rest
                        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or("")]
                };
                for n in names {
                    let n = n.trim_start_matches("self").trim();
                    if !n.is_empty() && n != module {
                        deps.insert(n.to_string());
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn no_two_agent_modules_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = imports(&src);
    // Depth-first search for a cycle, reporting its path.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(n) {
            return;
        }
        if let Some(i) = stack.iter().position(|s| s == n) {
            panic!(
                "agent modules import each other: {} -> {n}",
                stack[i..].join(" -> ")
            );
        }
        stack.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if graph.contains_key(d) {
                visit(d, graph, stack, done);
            }
        }
        stack.pop();
        done.insert(n.to_string());
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done);
    }
    assert!(graph.contains_key("agent") && graph.contains_key("bpf"));
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // The checker itself: a two-module cycle written to a scratch tree.
    let dir = std::env::temp_dir().join(format!("meshlane-shape-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("b")).expect("mkdir");
    fs::write(dir.join("a.rs"), "use crate::{b::x, c};\n").expect("write");
    fs::write(dir.join("b").join("mod.rs"), "fn f() { crate::a::g() }\n").expect("write");
    fs::write(dir.join("c.rs"), "\n").expect("write");
    let g = imports(&dir);
    fs::remove_dir_all(&dir).expect("cleanup");
    assert_eq!(g["a"], BTreeSet::from(["b".to_string(), "c".to_string()]));
    assert_eq!(g["b"], BTreeSet::from(["a".to_string()]));
}
