//! Render: what the run found and did, as a table for a person or one JSON
//! object per letter for a script, worded so a dry run never reads as if
//! it acted.

use serde::Serialize;

use crate::hyperline::matching::Candidate;

/// What the evidence says about one letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Found {
    /// Its charge is proven, and nobody else's.
    Charged,
    /// No transaction could be its charge.
    NotCharged,
    /// Its command's `succeeded` event is already in the results log.
    AlreadySucceeded,
    /// Another command that could claim its charge may not have spoken
    /// yet: left, to be judged by a later run.
    TooYoung,
    /// Neither is proven: left for a person.
    Uncertain,
}

impl Found {
    /// As the table says it.
    pub fn label(self) -> &'static str {
        match self {
            Found::Charged => "charged",
            Found::NotCharged => "not charged",
            Found::AlreadySucceeded => "already succeeded",
            Found::TooYoung => "too young to judge",
            Found::Uncertain => "uncertain",
        }
    }
}

/// Where the action stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A dry run: it would be done with `--apply`.
    Would,
    /// Done and confirmed by the broker.
    Done,
    /// Tried and not (or not known to be) done: the run exits 2.
    NotDone,
    /// Left for a person, or for a later run: the run exits 1.
    Left,
}

/// One uncertain dead letter, as printed (`--json` prints exactly this).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub command_id: String,
    /// Its customer.
    pub customer_id: String,
    /// Its product.
    pub product_id: String,
    /// Why the worker dead-lettered it.
    pub error_code: &'static str,
    /// Its first request that may have charged (RFC 3339, ms).
    pub first_attempt: Option<String>,
    /// When the worker dead-lettered it (RFC 3339, ms).
    pub died_at: Option<String>,
    /// What the evidence says.
    pub found: Found,
    /// What is (or, in a dry run, would be) done, in words.
    pub action: String,
    /// Where the action stands.
    pub status: Status,
    /// Whether the action was carried out and confirmed.
    pub applied: bool,
    /// The charge, when proven.
    pub transaction_id: Option<String>,
    /// Its invoice.
    pub invoice_id: Option<String>,
    /// The balance after it.
    pub new_credit_balance: Option<u64>,
    /// The transactions that could be its charge, when left.
    pub candidates: Vec<Candidate>,
    /// When too young to judge: from when a run can (RFC 3339, ms).
    pub run_again_after: Option<String>,
    /// Why it is left for a person, or why the action is not done.
    pub reason: Option<String>,
}

/// What the run did, for the summary.
#[derive(Default)]
pub struct Report {
    /// One per uncertain letter.
    pub rows: Vec<Row>,
    /// Dead letters that are not uncertain, left alone.
    pub others: usize,
    /// Listings read (one per customer and product).
    pub listings: usize,
    /// Why the results log proves nothing, when it does not.
    pub log_note: Option<String>,
    /// The clock margin the windows were widened by, in seconds.
    pub margin_secs: u64,
}

impl Report {
    /// docs/contract.md section 7: 2 when an action was not done, 1 when a letter
    /// is left for a person, 0 otherwise.
    pub fn exit_code(&self) -> u8 {
        let any = |s: Status| self.rows.iter().any(|r| r.status == s);
        match (any(Status::NotDone), any(Status::Left)) {
            (true, _) => 2,
            (false, true) => 1,
            (false, false) => 0,
        }
    }
}

/// The table, the candidates of the letters left, and the summary.
pub fn render(report: &Report, dead: &str, apply: bool) -> String {
    let mut out = String::new();
    if let Some(note) = &report.log_note {
        out.push_str(&format!("note: {note}\n"));
    }
    if report.rows.is_empty() {
        out.push_str(&format!(
            "no uncertain dead letter in {dead} ({} other(s) left alone)\n",
            report.others
        ));
        return out;
    }
    let header = [
        "COMMAND ID",
        "CODE",
        "FIRST ATTEMPT",
        "FOUND",
        "TRANSACTION",
        "INVOICE",
        "ACTION",
    ]
    .map(String::from);
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 7]> = report
        .rows
        .iter()
        .map(|r| {
            [
                r.command_id.clone(),
                r.error_code.to_owned(),
                dash(&r.first_attempt),
                r.found.label().to_owned(),
                dash(&r.transaction_id),
                dash(&r.invoice_id),
                r.action.clone(),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            line.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for r in report.rows.iter().filter(|r| r.reason.is_some()) {
        out.push_str(&format!(
            "\n{} ({}): {}\n",
            r.command_id,
            r.found.label(),
            dash(&r.reason)
        ));
        for c in &r.candidates {
            let at = crate::clock::rfc3339_ms(c.created_ms()).unwrap_or_default();
            out.push_str(&format!(
                "  candidate {}  invoice {}  balance_after {}  created_at {at}\n",
                c.transaction_id, c.invoice_id, c.balance_after
            ));
        }
    }
    let count = |f: Found| report.rows.iter().filter(|r| r.found == f).count();
    let status = |s: Status| report.rows.iter().filter(|r| r.status == s).count();
    out.push_str(&format!(
        "\n{} uncertain dead letter(s) in {dead}: {} charged, {} not charged, {} already \
         succeeded, {} too young to judge, {} left for a person; {} other(s) left alone; {} \
         listing(s) read; windows widened by {} s for clocks\n",
        report.rows.len(),
        count(Found::Charged),
        count(Found::NotCharged),
        count(Found::AlreadySucceeded),
        count(Found::TooYoung),
        count(Found::Uncertain),
        report.others,
        report.listings,
        report.margin_secs,
    ));
    match apply {
        false => out.push_str("dry run: nothing was changed; run with --apply to act\n"),
        true => out.push_str(&format!(
            "done: {}; not done: {}\n",
            status(Status::Done),
            status(Status::NotDone)
        )),
    }
    if status(Status::NotDone) > 0 {
        out.push_str(
            "some actions are not done (see their reason): their letters are back in the queue \
             or will be; running again is safe\n",
        );
    }
    out
}
