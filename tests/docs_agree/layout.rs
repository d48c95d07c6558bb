//! A contributor finds every file of the code in docs/development.md's
//! layout table: the table once named `src/configuration.rs`, which had
//! become a folder, and left out 13 source files and 11 test files.

use crate::{code_spans, files_under, read, section};

/// The folders whose every file the table lists.
const COVERED: [&str; 3] = ["src", "tests", "testkit"];

/// One row of the table: the paths of its first cell, and every code span
/// of the row.
struct Row {
    paths: Vec<String>,
    spans: Vec<String>,
}

fn rows() -> Vec<Row> {
    let page = read("docs/development.md");
    section(&page, "## Project layout")
        .lines()
        .filter(|l| l.starts_with("| `") || l.starts_with("| ["))
        .map(|line| {
            let first = line.split('|').nth(1).unwrap_or_default();
            Row {
                paths: code_spans(first),
                spans: code_spans(line),
            }
        })
        .collect()
}

/// Whether the table lists `file`: by its whole path anywhere, or in the
/// row of a folder holding it, by its path from that folder (`command.rs`,
/// `decision/tests.rs`; in `testkit/`, `app.rs` for `src/app.rs`).
fn listed(rows: &[Row], file: &str) -> bool {
    rows.iter().any(|row| {
        row.spans.iter().any(|s| s == file)
            || row.paths.iter().filter(|p| p.ends_with('/')).any(|folder| {
                let Some(rest) = file.strip_prefix(folder.as_str()) else {
                    return false;
                };
                let short = rest.strip_prefix("src/").unwrap_or(rest);
                row.spans.iter().any(|s| s == rest || s == short)
            })
    })
}

#[test]
fn the_layout_table_lists_every_file_of_the_code_and_its_tests() {
    let rows = rows();
    assert!(rows.len() > 10, "the layout table was found");
    let mut faults = Vec::new();
    for row in &rows {
        for path in &row.paths {
            let exists = crate::repo().join(path.trim_end_matches('/')).exists();
            if !exists {
                faults.push(format!("the table names `{path}`, which does not exist"));
            }
        }
    }
    for folder in COVERED {
        for file in files_under(folder) {
            if !listed(&rows, &file) {
                faults.push(format!("`{file}` is not in the table"));
            }
        }
    }
    assert!(
        faults.is_empty(),
        "docs/development.md, Project layout:\n{}",
        faults.join("\n")
    );
}
