//! The documentation cannot drift from the repository: a user who clones it
//! has nothing else to read. Every relative link of the Markdown pages
//! resolves to a file of the repository (and its anchor to a heading);
//! every section of docs/contract.md that the code and the docs cite
//! exists; nothing points at a folder outside the repository; and every
//! configuration key the code accepts is in docs/configuration.md with its
//! default. No broker needed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use credit_purchase_worker::configuration::Settings;
use regex::Regex;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Directories that hold no file of the project's own: build output,
/// dependencies installed by the examples, version control, fuzz output.
fn skipped(name: &str) -> bool {
    name.starts_with('.')
        || matches!(
            name,
            "target" | "node_modules" | "venv" | "__pycache__" | "corpus" | "artifacts"
        )
}

/// Every file under `dir` (relative to the repository) whose name ends with
/// one of `extensions`.
fn files(dir: &str, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![repo().join(dir)];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !skipped(&name) {
                    pending.push(path);
                }
            } else if extensions.iter().any(|ext| name.ends_with(ext)) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// README.md, the other pages at the root, and every page under docs/.
fn markdown_pages() -> Vec<PathBuf> {
    let root = std::fs::read_dir(repo())
        .expect("the repository")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "md"));
    let mut pages: Vec<PathBuf> = root.chain(files("docs", &[".md"])).collect();
    pages.sort();
    assert!(pages.iter().any(|p| p.ends_with("README.md")));
    pages
}

/// The page without its fenced code blocks and inline code spans, where a
/// `[x](y)` is an example, not a link.
fn prose(page: &str) -> String {
    let spans = Regex::new("`[^`]*`").expect("regex");
    let mut out = String::new();
    let mut fenced = false;
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(&spans.replace_all(line, "``"));
            out.push('\n');
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces
/// to hyphens; a repeated heading gets `-1`, `-2`...
fn anchors(page: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    let mut fenced = false;
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        if fenced {
            continue;
        }
        let slug: String = title
            .trim_start_matches('#')
            .trim()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .flat_map(char::to_lowercase)
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        anchors.insert(match *count {
            0 => slug,
            n => format!("{slug}-{n}"),
        });
        *count += 1;
    }
    anchors
}

/// `path`, normalised, when it stays inside the repository.
fn inside_repository(path: &Path) -> Option<PathBuf> {
    let mut normal = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                if !normal.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal.starts_with(repo()).then_some(normal)
}

#[test]
fn every_relative_link_of_the_docs_resolves_inside_the_repository() {
    let inline = Regex::new(r#"\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)"#).expect("regex");
    let reference = Regex::new(r"(?m)^\s*\[[^\]]+\]:\s*(\S+)").expect("regex");
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in markdown_pages() {
        let text = read(&page);
        let prose = prose(&text);
        let targets = inline
            .captures_iter(&prose)
            .chain(reference.captures_iter(&prose))
            .map(|c| c[1].to_owned());
        for target in targets {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if file.is_empty() {
                Some(page.clone())
            } else {
                inside_repository(&page.parent().expect("a folder").join(file))
            };
            let name = page.strip_prefix(repo()).unwrap_or(&page).display();
            let Some(resolved) = resolved.filter(|p| p.exists()) else {
                broken.push(format!("{name}: {target} (no such file in the repository)"));
                continue;
            };
            let is_page = resolved.extension().is_some_and(|e| e == "md");
            if !anchor.is_empty() && is_page && !anchors(&read(&resolved)).contains(anchor) {
                broken.push(format!("{name}: {target} (no such heading)"));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser right?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The files that may cite the contract or the docs.
fn cited_in() -> Vec<PathBuf> {
    let text = [
        ".rs", ".md", ".toml", ".yaml", ".yml", ".json", ".py", ".js", ".mjs", ".sh",
    ];
    let mut all: Vec<PathBuf> = ["src", "tests", "testkit", "benches", "fuzz", "docs"]
        .into_iter()
        .chain(["deploy", "config", "examples", ".ci"])
        .flat_map(|dir| files(dir, &text))
        .collect();
    all.extend(markdown_pages());
    all.push(repo().join(".ci/run"));
    all.push(repo().join("Cargo.toml"));
    all.sort();
    all.dedup();
    all.retain(|p| p.exists() && !p.ends_with("package-lock.json"));
    all
}

/// The text with line breaks, comment leaders and indentation folded into
/// single spaces, so a citation wrapped over two comment lines reads whole.
fn folded(text: &str) -> String {
    text.lines()
        .map(|l| {
            l.trim()
                .trim_start_matches("//!")
                .trim_start_matches("///")
                .trim_start_matches("//")
                .trim_start_matches('#')
                .trim()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn every_cited_section_of_the_contract_exists() {
    let contract = read(&repo().join("docs/contract.md"));
    let heading = Regex::new(r"(?m)^#{2,3} (\d+(?:\.\d+)?)\.? ").expect("regex");
    let sections: BTreeSet<String> = heading
        .captures_iter(&contract)
        .map(|c| c[1].to_owned())
        .collect();
    for n in 1..=8 {
        assert!(
            sections.contains(&n.to_string()),
            "section {n}: {sections:?}"
        );
    }
    let citation = Regex::new(
        r"contract\.md\)?,? sections? (\d+(?:\.\d+)?(?:(?:, | and | or )\d+(?:\.\d+)?)*)",
    )
    .expect("regex");
    let number = Regex::new(r"\d+(?:\.\d+)?").expect("regex");
    let mut missing = Vec::new();
    let mut cited = 0;
    for file in cited_in() {
        let text = folded(&read(&file));
        for found in citation.captures_iter(&text) {
            for n in number.find_iter(&found[1]) {
                cited += 1;
                if !sections.contains(n.as_str()) {
                    let name = file.strip_prefix(repo()).unwrap_or(&file).display();
                    missing.push(format!("{name}: \"{}\"", &found[0]));
                }
            }
        }
    }
    assert!(
        cited > 30,
        "only {cited} citations found: is the pattern right?"
    );
    assert!(
        missing.is_empty(),
        "sections cited but not in docs/contract.md:\n{}",
        missing.join("\n")
    );
}

#[test]
fn nothing_points_at_a_folder_outside_the_repository() {
    // Spelled in pieces, so this file does not match itself.
    let outside = [
        ["CONTRACT", ".md"].concat(),
        ["CONTRACT", " section"].concat(),
        ["CONTRACT", " §"].concat(),
        ["PITFALLS", ".md"].concat(),
        ["../", "shared"].concat(),
        ["shared", " folder"].concat(),
    ];
    let mut found = Vec::new();
    for file in cited_in() {
        let text = folded(&read(&file));
        for needle in &outside {
            if text.contains(needle.as_str()) {
                let name = file.strip_prefix(repo()).unwrap_or(&file).display();
                found.push(format!("{name}: {needle}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "cite docs/ instead:\n{}",
        found.join("\n")
    );
}

/// What one walk through `Settings`' `Deserialize` found at the end of its
/// path: a struct with these fields, or a value.
enum Found {
    Struct(&'static [&'static str]),
    Leaf,
}

/// A deserializer that follows `path` through nested structs (by handing
/// each struct a map of one entry) and, at its end, records what was asked
/// for, then stops. Nothing but serde's derived code decides the names, so
/// the keys found are exactly the ones the settings read.
struct Walker<'a> {
    path: &'a [&'static str],
    found: &'a RefCell<Option<Found>>,
}

fn stop() -> de::value::Error {
    de::Error::custom("walked")
}

impl<'de> Deserializer<'de> for Walker<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        if self.path.is_empty() {
            *self.found.borrow_mut() = Some(Found::Leaf);
        }
        Err(stop())
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.path.split_first() {
            None => {
                *self.found.borrow_mut() = Some(Found::Struct(fields));
                Err(stop())
            }
            Some((key, rest)) => visitor.visit_map(OneEntry {
                key: Some(key),
                rest,
                found: self.found,
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

/// The one field a walk goes down.
struct OneEntry<'a> {
    key: Option<&'static str>,
    rest: &'a [&'static str],
    found: &'a RefCell<Option<Found>>,
}

impl<'de> MapAccess<'de> for OneEntry<'_> {
    type Error = de::value::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        self.key
            .take()
            .map(|key| seed.deserialize(key.into_deserializer()))
            .transpose()
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        seed.deserialize(Walker {
            path: self.rest,
            found: self.found,
        })
    }
}

/// Every key `Settings` reads, dotted (`amqp.url`), from its serde fields.
fn accepted_keys() -> Vec<String> {
    fn walk(path: &mut Vec<&'static str>, keys: &mut Vec<String>) {
        let found = RefCell::new(None);
        let outcome = <Settings as serde::Deserialize>::deserialize(Walker {
            path: path.as_slice(),
            found: &found,
        });
        assert!(outcome.is_err(), "a walk always stops");
        match found.into_inner() {
            Some(Found::Struct(fields)) => {
                for field in fields {
                    path.push(field);
                    walk(path, keys);
                    path.pop();
                }
            }
            Some(Found::Leaf) => keys.push(path.join(".")),
            None => panic!("the walk to {path:?} found nothing"),
        }
    }
    let mut keys = Vec::new();
    walk(&mut Vec::new(), &mut keys);
    keys
}

/// A default as docs/configuration.md writes it.
fn written(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) if s.is_empty() => "\"\"".to_owned(),
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(written).collect();
            format!("[{}]", items.join(", "))
        }
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => panic!("a default of another kind: {other:?}"),
    }
}

#[test]
fn every_configuration_key_is_documented_with_its_default() {
    let keys = accepted_keys();
    assert!(keys.len() > 30, "{keys:?}");
    assert!(keys.contains(&"amqp.url".to_owned()), "{keys:?}");
    // The compiled-in defaults (`configuration.rs` includes this file).
    let defaults: toml::Table =
        toml::from_str(&read(&repo().join("config/default.toml"))).expect("default.toml");
    let page = read(&repo().join("docs/configuration.md"));
    // `| `key` | default | meaning |`: the key alone in its first cell.
    let row = Regex::new(r"(?m)^\| `([a-z_]+\.[a-z_]+)` \| ([^|]*) \|").expect("regex");
    let documented: BTreeMap<&str, &str> = row
        .captures_iter(&page)
        .map(|c| {
            let (key, default) = (c.get(1), c.get(2));
            (
                key.map_or("", |m| m.as_str()),
                default.map_or("", |m| m.as_str().trim()),
            )
        })
        .collect();
    let first_code = Regex::new("`([^`]*)`").expect("regex");
    let mut wrong = Vec::new();
    for key in &keys {
        let Some(cell) = documented.get(key.as_str()) else {
            wrong.push(format!("`{key}` has no row"));
            continue;
        };
        let (section, name) = key.split_once('.').expect("dotted");
        match defaults.get(section).and_then(|s| s.get(name)) {
            Some(value) => {
                let expected = written(value);
                let shown = first_code.captures(cell).map(|c| c[1].to_owned());
                if shown.as_deref() != Some(expected.as_str()) {
                    wrong.push(format!(
                        "`{key}`: the default is `{expected}`, the page says {cell}"
                    ));
                }
            }
            None if cell.starts_with("none") => {}
            None => wrong.push(format!(
                "`{key}` has no default: the page should say none, not {cell}"
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/configuration.md:\n{}",
        wrong.join("\n")
    );
}

/// The consumer-timeout budget as the start-up check counts it: the pages
/// that state it say the code's number of confirm waits, the defaults'
/// settle bound and the refusal line the code prints (they said 10 waits
/// and 630 s while the code counted 16).
#[test]
fn the_consumer_timeout_budget_in_the_docs_is_the_codes() {
    use credit_purchase_worker::configuration::{
        CONFIRM_WAITS_AFTER_DEADLINE as WAITS, after_deadline_secs, budget_line,
    };
    let flat = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let bounds = flat(&read(&repo().join("docs/blocked-and-bounds.md")));
    let configuration = flat(&read(&repo().join("docs/configuration.md")));
    for (page, text, said) in [
        (
            "blocked-and-bounds.md",
            &bounds,
            format!("+ {WAITS} × amqp.confirm_timeout_secs"),
        ),
        (
            "blocked-and-bounds.md",
            &bounds,
            format!("The {WAITS} is `CONFIRM_WAITS_AFTER_DEADLINE`"),
        ),
        (
            "configuration.md",
            &configuration,
            format!("({WAITS} × `amqp.confirm_timeout_secs`"),
        ),
    ] {
        assert!(text.contains(&said), "docs/{page} must say `{said}`");
    }
    let defaults = Settings::load_from(None, []).expect("the defaults are valid");
    let printed = format!("✓ {}", budget_line(&defaults));
    assert!(
        bounds.contains(&printed),
        "docs/blocked-and-bounds.md must quote what `check` prints:\n{printed}"
    );
    let settled = defaults.worker.delivery_deadline_secs + after_deadline_secs(&defaults);
    let said = format!("a delivery is settled within {settled} s");
    assert!(
        bounds.contains(&said),
        "docs/blocked-and-bounds.md must say `{said}`"
    );
    let deadline = [(
        "CPW__WORKER__DELIVERY_DEADLINE_SECS".to_owned(),
        "1200".to_owned(),
    )];
    let refused = Settings::load_from(None, deadline)
        .expect_err("1200 s and what follows it reach the consumer timeout")
        .to_string();
    assert!(
        bounds.contains(&flat(&refused)),
        "docs/blocked-and-bounds.md must show the line the code prints:\n{refused}"
    );
}
