//! The layering rule, checked on the source: the machine and everything it is built from
//! (memory, KVM state, boot, tracking, demand paging, raw syscalls) never import the layers
//! that use them (migration, the control API, snapshots). Those reach down through hooks and
//! plain data (`machine::run::RunHooks`, `machine::progress`).

use std::path::{Path, PathBuf};

const LOWER_DIRS: &[&str] = &[
    "machine",
    "vstate",
    "memory",
    "boot",
    "tracking",
    "userfault",
    "sys",
];
const LOWER_FILES: &[&str] = &[
    "micro_check.rs",
    "micro_finish.rs",
    "micro_port.rs",
    "host.rs",
    "host_file.rs",
    "output.rs",
];
const UPPER: &[&str] = &["migration", "api", "snapshot"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `file:line: text` of every line in `src` that names an upper layer through `crate::`.
fn upward_imports(path: &Path, src: &str) -> Vec<String> {
    src.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .filter(|(_, l)| UPPER.iter().any(|u| l.contains(&format!("crate::{u}"))))
        .map(|(i, l)| format!("{}:{}: {}", path.display(), i + 1, l.trim()))
        .collect()
}

#[test]
fn no_module_below_machine_imports_migration_api_or_snapshot() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for d in LOWER_DIRS {
        rust_files(&src.join(d), &mut files);
    }
    files.extend(LOWER_FILES.iter().map(|f| src.join(f)));
    assert!(files.len() > 40, "the source tree was not found: {files:?}");
    let mut found = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        found.extend(upward_imports(f, &text));
    }
    assert!(found.is_empty(), "upward imports:\n{}", found.join("\n"));
}

#[test]
fn an_upward_import_is_found_and_a_comment_is_not() {
    let p = Path::new("x.rs");
    let src = "use crate::memory::GuestRam;\n// crate::migration in a comment\n\
               let s = crate::api::server::serve_api;\n";
    assert_eq!(
        upward_imports(p, src),
        ["x.rs:3: let s = crate::api::server::serve_api;"]
    );
}
