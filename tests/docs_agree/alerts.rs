//! An operator at 3 a.m. trusts the alert pages: an alert a page tells them
//! to set is one `deploy/prometheus/rules.yml` has (it once said to alert on
//! `cpw_broker_blocked`, and no rule did), and a runbook gives a command to
//! run, with every command of the worker it names a real one (the
//! `CpwUnexpectedResponse` runbook said "discard", which no command does).

use clap::CommandFactory;
use credit_purchase_worker::cli::Cli;
use regex::Regex;
use serde_json::Value;

use crate::{code_spans, markdown_pages, read, section};

const RULES: &str = "deploy/prometheus/rules.yml";

/// One alert rule: its name, expression and description.
struct Rule {
    name: String,
    expr: String,
    description: String,
}

fn rules() -> Vec<Rule> {
    let file: Value = serde_norway::from_str(&read(RULES)).expect("YAML");
    let text = |v: &Value, pointer: &str| {
        v.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{RULES}: no {pointer} in {v}"))
            .to_owned()
    };
    file["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .map(|r| Rule {
            name: text(&r, "/alert"),
            expr: text(&r, "/expr"),
            description: text(&r, "/annotations/description"),
        })
        .collect()
}

/// The paragraphs, list items and table rows of a page: a block ends at a
/// blank line, and a list item or a table row starts one of its own.
fn blocks(page: &str) -> Vec<String> {
    let item = Regex::new(r"^\s*([-*]|\d+\.)\s").expect("regex");
    let mut blocks = vec![String::new()];
    for line in page.lines() {
        if line.trim().is_empty() || item.is_match(line) || line.starts_with('|') {
            blocks.push(String::new());
        }
        let last = blocks.last_mut().expect("a block");
        last.push_str(line);
        last.push('\n');
    }
    blocks.retain(|b| !b.trim().is_empty());
    blocks
}

#[test]
fn every_alert_a_page_asks_for_is_a_rule() {
    let rules = rules();
    let asks = Regex::new(r"(?i)\balert(ing)? on\b").expect("regex");
    let metric = Regex::new(r"\bcpw_[a-z0-9_]+").expect("regex");
    let label = Regex::new(r#"[a-z_]+="[a-z_]+""#).expect("regex");
    let alert_name = Regex::new(r"\bCpw[A-Z][A-Za-z]+\b").expect("regex");
    let mut missing = Vec::new();
    for page in markdown_pages() {
        let text = read(&page);
        for block in blocks(&text).iter().filter(|b| asks.is_match(b)) {
            for span in code_spans(block) {
                for m in metric.find_iter(&span) {
                    let word = Regex::new(&format!(r"\b{}\b", m.as_str())).expect("regex");
                    if !rules.iter().any(|r| word.is_match(&r.expr)) {
                        missing.push(format!(
                            "{page}: asks for an alert on `{}`, and no rule of {RULES} reads it:\n{block}",
                            m.as_str()
                        ));
                    }
                }
                for l in label.find_iter(&span) {
                    if !rules.iter().any(|r| r.expr.contains(l.as_str())) {
                        missing.push(format!(
                            "{page}: asks for an alert on `{}`, and no rule of {RULES} selects it:\n{block}",
                            l.as_str()
                        ));
                    }
                }
            }
        }
        for name in alert_name.find_iter(&text) {
            if !rules.iter().any(|r| r.name == name.as_str()) {
                missing.push(format!(
                    "{page}: names the alert {}, not in {RULES}",
                    name.as_str()
                ));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n\n"));
}

/// The programs whose invocation counts as a command an operator can run.
const PROGRAMS: [&str; 7] = [
    "credit-purchase-worker",
    "dead-letters",
    "kubectl",
    "rabbitmqctl",
    "rabbitmq-diagnostics",
    "curl",
    "promtool",
];

/// Whether `span` invokes one of [`PROGRAMS`].
fn is_command(span: &str) -> bool {
    span.split_whitespace()
        .next()
        .is_some_and(|first| PROGRAMS.contains(&first))
}

/// Checks a command of the worker (`credit-purchase-worker …` or
/// `dead-letters …`) against the command line's own definition: each
/// subcommand exists, and each `--flag` is one of the last subcommand's.
fn check_worker_command(span: &str) -> Result<(), String> {
    let mut tokens = span.split_whitespace().peekable();
    match tokens.peek() {
        Some(&"credit-purchase-worker") => {
            tokens.next();
        }
        Some(&"dead-letters") => {}
        _ => return Ok(()),
    }
    let mut command = Cli::command();
    command.build();
    let mut path = vec!["credit-purchase-worker".to_owned()];
    while let Some(word) = tokens.peek().filter(|w| !w.starts_with('-')) {
        if !command.has_subcommands() {
            break;
        }
        let Some(sub) = command.find_subcommand(word).cloned() else {
            return Err(format!(
                "`{span}`: `{}` has no subcommand `{word}`",
                path.join(" ")
            ));
        };
        path.push((*word).to_owned());
        command = sub;
        tokens.next();
    }
    for token in tokens {
        let Some(flag) = token.strip_prefix("--") else {
            continue;
        };
        let flag = flag.split('=').next().unwrap_or(flag);
        let known = flag == "help" || command.get_arguments().any(|a| a.get_long() == Some(flag));
        if !known {
            return Err(format!(
                "`{span}`: `{}` has no flag `--{flag}`",
                path.join(" ")
            ));
        }
    }
    Ok(())
}

#[test]
fn the_command_checker_knows_real_commands_from_made_up_ones() {
    for real in [
        "credit-purchase-worker dead-letters reconcile --apply",
        "dead-letters purge --command-id <id>",
        "credit-purchase-worker events --command-id 1 --json",
        "credit-purchase-worker check",
    ] {
        assert_eq!(check_worker_command(real), Ok(()), "{real}");
    }
    for made_up in [
        "dead-letters discard",
        "credit-purchase-worker dead-letters replay --everything",
        "credit-purchase-worker reconcile",
    ] {
        assert!(check_worker_command(made_up).is_err(), "{made_up}");
    }
}

#[test]
fn every_runbook_gives_a_command_and_every_command_it_names_exists() {
    let guide = read("docs/operations.md");
    let runbooks = section(&guide, "## Alerts: what to do");
    let mut faults = Vec::new();
    let mut seen = 0;
    for runbook in runbooks.split("\n### ").skip(1) {
        seen += 1;
        let name = runbook.lines().next().unwrap_or_default();
        let commands: Vec<String> = code_spans(runbook)
            .into_iter()
            .filter(|s| is_command(s))
            .collect();
        if commands.is_empty() {
            faults.push(format!(
                "docs/operations.md, runbook {name}: no command to run (one of {PROGRAMS:?})"
            ));
        }
        for command in &commands {
            if let Err(e) = check_worker_command(command) {
                faults.push(format!("docs/operations.md, runbook {name}: {e}"));
            }
        }
    }
    assert!(seen >= 7, "the runbooks of docs/operations.md were found");
    for rule in rules() {
        for command in code_spans(&rule.description)
            .iter()
            .filter(|s| is_command(s))
        {
            if let Err(e) = check_worker_command(command) {
                faults.push(format!("{RULES}, {}: {e}", rule.name));
            }
        }
    }
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}
