//! One fact, one page: the docs cannot disagree with the code, the alert
//! rules or each other on what a newcomer checks first. Every alert a page
//! tells operators to set exists; every runbook gives a command, and every
//! command of the worker it names exists; the layout table of
//! docs/development.md lists every file of the code and its tests; measured
//! figures live in BENCHMARKS.md alone; the project has one version number.
//! No broker needed: these tests read files (and the command line's
//! definition).

mod alerts;
mod figures;
mod layout;
mod versions;

use std::path::{Path, PathBuf};

use regex::Regex;

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file of the repository, by its path from the root.
pub(crate) fn read(path: &str) -> String {
    let full = repo().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Directories that hold no file of the project's own: build output,
/// dependencies installed by the examples, version control.
pub(crate) fn skipped(name: &str) -> bool {
    name.starts_with('.') || matches!(name, "target" | "node_modules" | "__pycache__")
}

/// Every file under `dir`, as paths from the repository's root with `/`.
pub(crate) fn files_under(dir: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![repo().join(dir)];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !skipped(&name) {
                    pending.push(path);
                }
            } else {
                found.push(relative(&path));
            }
        }
    }
    found.sort();
    found
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo())
        .expect("inside the repository")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// README.md, the other pages at the root, and every page under docs/.
pub(crate) fn markdown_pages() -> Vec<String> {
    let mut pages: Vec<String> = std::fs::read_dir(repo())
        .expect("the repository")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "md"))
        .map(|p| relative(&p))
        .chain(
            files_under("docs")
                .into_iter()
                .filter(|p| p.ends_with(".md")),
        )
        .collect();
    pages.sort();
    pages
}

/// The inline code spans of `text` (between single backticks; a span
/// wrapped over two lines reads as one, its whitespace folded), fenced code
/// blocks left out.
pub(crate) fn code_spans(text: &str) -> Vec<String> {
    let fence = Regex::new("(?s)```.*?```").expect("regex");
    let span = Regex::new("`([^`]+)`").expect("regex");
    let text = fence.replace_all(text, "");
    span.captures_iter(&text)
        .map(|c| c[1].split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The lines of `page` from the heading `heading` (a whole line) to the
/// next heading of the same or a higher level, or to the end; a `#` line in
/// a fenced code block is no heading.
pub(crate) fn section(page: &str, heading: &str) -> String {
    let level = |line: &str| {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        (hashes > 0 && line[hashes..].starts_with(' ')).then_some(hashes)
    };
    let own = level(heading).expect("a heading");
    let mut lines = page.lines().skip_while(|l| *l != heading);
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no heading `{heading}`"));
    let mut out = vec![first];
    let mut fenced = false;
    for line in lines {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && level(line).is_some_and(|l| l <= own) {
            break;
        }
        out.push(line);
    }
    out.join("\n")
}
