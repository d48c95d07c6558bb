//! A measured figure has one home, BENCHMARKS.md, where the machine, the
//! run and what limits it are written beside it. The README's performance
//! table once gave 10,291/s, 0.98× and 45.1 MB, figures of an older run than
//! BENCHMARKS.md's, and RELIABILITY.md a third memory figure.

use regex::Regex;

use crate::{read, section};

/// A measured figure: a rate, a ratio, a share, a size or a time.
fn figures(text: &str) -> Vec<String> {
    let figure =
        Regex::new(r"\d[\d,]*(\.\d+)?\s?(/s\b|×|%|\s?MB\b|\s?ms\b|\s?CPU-s\b|\s?commands/s\b)")
            .expect("regex");
    figure
        .find_iter(text)
        .map(|m| m.as_str().to_owned())
        .collect()
}

#[test]
fn the_readme_quotes_no_benchmark_figure_and_links_to_the_results() {
    let readme = read("README.md");
    let performance = section(&readme, "## Performance");
    let copied = figures(&performance);
    assert!(
        copied.is_empty(),
        "README.md, Performance: figures copied from a benchmark run, which drift from \
         BENCHMARKS.md's: {copied:?}"
    );
    assert!(
        performance.contains("(BENCHMARKS.md#results)"),
        "README.md, Performance: no link to BENCHMARKS.md's results:\n{performance}"
    );
    assert!(
        read("BENCHMARKS.md").contains("\n## Results\n"),
        "the section the README links to"
    );
}

#[test]
fn reliability_gives_no_memory_figure_of_its_own() {
    let page = read("RELIABILITY.md");
    let sizes: Vec<String> = figures(&page)
        .into_iter()
        .filter(|f| f.ends_with("MB"))
        .collect();
    assert!(
        sizes.is_empty(),
        "RELIABILITY.md: memory figures of a benchmark run (BENCHMARKS.md has them): {sizes:?}"
    );
}
