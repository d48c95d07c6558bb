//! The Dockerfile: exposed port, non-root user, the stub build.

use crate::common::*;

#[derive(Debug)]
pub(crate) struct Stage {
    pub(crate) name: Option<String>,
    /// `(INSTRUCTION, arguments)`, continuation lines joined.
    instructions: Vec<(String, String)>,
}

pub(crate) fn dockerfile_stages() -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.is_empty()) {
        let (instruction, args) = line.split_once(' ').unwrap_or((&line, ""));
        let instruction = instruction.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if instruction == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                _ => None,
            };
            stages.push(Stage {
                name,
                instructions: vec![(instruction, args)],
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push((instruction, args));
        }
    }
    stages
}

impl Stage {
    fn last(&self, instruction: &str) -> Option<&str> {
        self.instructions
            .iter()
            .rev()
            .find(|(i, _)| i == instruction)
            .map(|(_, a)| a.as_str())
    }
}

#[test]
pub(crate) fn the_images_expose_the_ops_port_and_run_the_worker_as_non_root() {
    let port = ops_port();
    let stages = dockerfile_stages();
    let runtimes: Vec<&Stage> = stages
        .iter()
        .filter(|s| s.last("ENTRYPOINT").is_some())
        .collect();
    assert!(!runtimes.is_empty());
    let last = stages.last().expect("stages");
    assert!(
        last.last("ENTRYPOINT").is_some(),
        "the default image runs the worker"
    );
    for stage in runtimes {
        let name = stage.name.as_deref().unwrap_or("unnamed");
        let user = stage
            .last("USER")
            .unwrap_or_else(|| panic!("{name}: no USER, so root"));
        let uid = user.split(':').next().expect("uid");
        assert!(
            uid != "0" && uid != "root" && uid.parse::<u32>().is_ok_and(|u| u > 0),
            "{name}: USER {user} must be numeric and not root (runAsNonRoot checks it)"
        );
        let exposed: Vec<&str> = stage
            .instructions
            .iter()
            .filter(|(i, _)| i == "EXPOSE")
            .flat_map(|(_, a)| a.split_whitespace())
            .collect();
        assert!(
            exposed.contains(&port.to_string().as_str())
                || exposed.contains(&format!("{port}/tcp").as_str()),
            "{name}: EXPOSE {port}"
        );
        let entrypoint: Vec<String> =
            serde_json::from_str(stage.last("ENTRYPOINT").expect("entrypoint")).expect("exec form");
        assert!(
            entrypoint[0].ends_with("/credit-purchase-worker"),
            "{entrypoint:?}"
        );
        let cmd: Vec<String> =
            serde_json::from_str(stage.last("CMD").expect("CMD")).expect("exec form");
        assert_eq!(cmd, ["run"], "{name}");
    }
    let builder = stages.first().expect("a builder");
    assert!(builder.last("FROM").is_some_and(|f| f.starts_with("rust:")));
    assert!(
        builder
            .instructions
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked"))
    );
}

/// The dependency layer builds the manifest against stub `src/lib.rs` and
/// `src/main.rs` only; another explicit target (a `[[bench]]` with its own
/// file, say) would make that step fail to load the manifest.
#[test]
pub(crate) fn the_manifest_has_no_target_the_dockerfile_stub_build_would_miss() {
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    assert_eq!(manifest["lib"]["path"].as_str(), Some("src/lib.rs"));
    let bins = manifest["bin"].as_array().expect("[[bin]]");
    assert_eq!(bins.len(), 1);
    assert_eq!(bins[0]["name"].as_str(), Some("credit-purchase-worker"));
    assert_eq!(bins[0]["path"].as_str(), Some("src/main.rs"));
    // Every [[bench]] needs a stub in the dependency layer and its sources
    // copied before the real build, or the manifest does not load.
    let dockerfile = read("deploy/Dockerfile");
    for bench in manifest
        .get("bench")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let name = bench["name"].as_str().expect("bench name");
        let path = bench
            .get("path")
            .and_then(|p| p.as_str())
            .map_or_else(|| format!("benches/{name}.rs"), str::to_owned);
        assert!(
            dockerfile.contains(&format!("> {path}")),
            "deploy/Dockerfile's dependency layer lacks a stub at {path} for bench `{name}`"
        );
        assert!(
            dockerfile.contains("COPY benches ./benches"),
            "deploy/Dockerfile does not copy benches/"
        );
    }
    // A crate patched by path is built in the dependency layer: its sources
    // are copied before it.
    let stub_build = dockerfile
        .find("cargo build --release --locked")
        .expect("the dependency layer");
    for patched in manifest
        .get("patch")
        .and_then(|p| p.get("crates-io"))
        .and_then(|p| p.as_table())
        .into_iter()
        .flat_map(|t| t.values())
    {
        let path = patched["path"].as_str().expect("a patch by path");
        let top = path.split('/').next().expect("a path");
        let copy = dockerfile.find(&format!("COPY {top} ./{top}\n"));
        assert!(
            copy.is_some_and(|at| at < stub_build),
            "deploy/Dockerfile does not copy {top}/ (the patched crate {path}) before the dependency layer's build"
        );
    }
    for section in ["example", "test"] {
        assert!(
            !manifest.contains_key(section),
            "[[{section}]] in Cargo.toml: give it a stub in deploy/Dockerfile's dependency layer"
        );
    }
    assert!(
        !manifest.contains_key("build"),
        "build.rs: copy it in deploy/Dockerfile"
    );
    assert!(
        manifest["package"].get("build").is_none(),
        "build.rs: copy it in deploy/Dockerfile"
    );
}
