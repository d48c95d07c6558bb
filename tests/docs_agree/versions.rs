//! One version number: Cargo.toml's. The AsyncAPI document, the image tags
//! of the deployment guide and the changelog's latest release say the same
//! (they once said 1.0.0, 1.4.0 and nothing, against 0.1.0). And what a
//! project ships beside its code is there: the licence Cargo.toml names, a
//! changelog with its versioning policy, a security policy, a contributing
//! guide.

use regex::Regex;
use serde_json::Value;

use crate::{files_under, markdown_pages, read};

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[test]
fn every_version_number_is_cargo_tomls() {
    let mut faults = Vec::new();
    let asyncapi: Value = serde_norway::from_str(&read("docs/asyncapi.yaml")).expect("YAML");
    if asyncapi["info"]["version"] != VERSION {
        faults.push(format!(
            "docs/asyncapi.yaml: info.version {}",
            asyncapi["info"]["version"]
        ));
    }
    let tag = Regex::new(r#"(credit-purchase-worker:|newTag: "?)(\d+\.\d+\.\d+)"#).expect("regex");
    let deploy = files_under("deploy");
    for file in markdown_pages().iter().chain(&deploy) {
        let Ok(text) = std::fs::read_to_string(crate::repo().join(file)) else {
            continue;
        };
        for found in tag.captures_iter(&text) {
            if &found[2] != VERSION {
                faults.push(format!("{file}: {}", &found[0]));
            }
        }
    }
    let changelog = std::fs::read_to_string(crate::repo().join("CHANGELOG.md")).unwrap_or_default();
    let release = Regex::new(r"(?m)^## \[?(\d+\.\d+\.\d+)").expect("regex");
    match release.captures(&changelog) {
        Some(latest) if &latest[1] == VERSION => {}
        other => faults.push(format!(
            "CHANGELOG.md: the latest release is {:?}",
            other.map(|c| c[1].to_owned())
        )),
    }
    assert!(
        faults.is_empty(),
        "version {VERSION} (Cargo.toml) disagrees with:\n{}",
        faults.join("\n")
    );
}

#[test]
fn the_project_ships_its_licence_changelog_and_policies() {
    let root = crate::repo();
    let missing: Vec<&str> = ["LICENSE", "CHANGELOG.md", "SECURITY.md", "CONTRIBUTING.md"]
        .into_iter()
        .filter(|f| !root.join(f).is_file())
        .collect();
    assert!(missing.is_empty(), "missing at the root: {missing:?}");
    assert_eq!(env!("CARGO_PKG_LICENSE"), "MIT");
    assert!(
        read("LICENSE").starts_with("MIT License"),
        "LICENSE is the MIT licence Cargo.toml names"
    );
    let changelog = read("CHANGELOG.md");
    for needed in ["## Versioning", "breaking"] {
        assert!(
            changelog.contains(needed),
            "CHANGELOG.md says how versions move ({needed})"
        );
    }
}
