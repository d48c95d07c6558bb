//! `dead-letters show`: everything one dead letter holds, laid out for the
//! decision an operator has to make about it.
//!
//! `list` gives one line per letter; before replaying or purging an
//! `unexpected_response` (the customer may have been charged), the operator
//! needs the whole story: what the worker concluded, what Hyperline last
//! answered, when the idempotency window opened, every header, and the
//! body (pretty-printed when it is JSON, as it came otherwise). The letter is
//! read like `list` reads the queue, and put back without wearing it.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::AMQPValue;

use super::dead_letter_queue::{Error, Reading};
use super::letter::{DeadLetterInfo, Window, inspect_in, window};
use super::output;
use crate::broker::{HistoryKeys, Topology};
use crate::cli::ShowArgs;
use crate::configuration::Settings;

/// `dead-letters show --command-id`: prints every dead letter of the command
/// (a command dead-lettered twice has two), and puts them back. Exit status
/// 1 when there is none.
pub async fn show(config: Option<&Path>, args: ShowArgs) -> Result<ExitCode, Error> {
    let settings = Settings::load(config)?;
    let keys = HistoryKeys::from_settings(&settings);
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let connection = super::connect(&settings.amqp, "dead-letters").await?;
    let result = async {
        let (reading, held) = Reading::start(&connection, &settings, &topology.dead).await?;
        let shown: Vec<String> = held
            .iter()
            .map(|d| (d, inspect_in(&topology, d, keys.as_ref())))
            .filter(|(_, info)| info.command_id.as_deref() == Some(args.command_id.as_str()))
            .map(|(d, info)| render(d, &info, &settings, &topology))
            .collect();
        reading.put_back(&held).await?;
        reading.finish("shown").await.map_err(Error::PutBack)?;
        Ok::<_, Error>(shown)
    }
    .await;
    super::close(&connection).await;
    let shown = result?;
    if shown.is_empty() {
        output::line(format_args!(
            "no dead letter with command id {} in {}",
            args.command_id, topology.dead
        ));
        return Ok(ExitCode::from(1));
    }
    let total = shown.len();
    for (n, text) in shown.into_iter().enumerate() {
        if total > 1 {
            output::line(format_args!("--- dead letter {} of {total}", n + 1));
        }
        output::block(text);
    }
    Ok(ExitCode::SUCCESS)
}

/// One letter: the worker's reading, the idempotency window, the message's
/// properties and headers, then the body.
fn render(
    delivery: &Delivery,
    info: &DeadLetterInfo,
    settings: &Settings,
    topology: &Topology,
) -> String {
    let dash = |s: Option<&str>| s.unwrap_or("-").to_owned();
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<18}{value}");
    };
    field("command id", dash(info.command_id.as_deref()));
    field("code", dash(info.error_code));
    field(
        "last HTTP status",
        info.last_status
            .map_or_else(|| "-".to_owned(), |s| s.to_string()),
    );
    field(
        "attempts",
        info.attempts
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
    );
    field("first attempt", dash(info.first_attempt.as_deref()));
    field("last attempt", dash(info.last_attempt.as_deref()));
    field("died at", dash(info.died_at.as_deref()));
    field("replica", dash(info.replica.as_deref()));
    field("queue", dash(info.queue.as_deref()));
    let lane = match &info.lane {
        Some(lane) => lane.clone(),
        None => format!(
            "- (its queue is no configured lane's: a replay puts it in the first lane, `{}`)",
            topology.lane(0).name
        ),
    };
    field("lane", lane);
    if let Some(reason) = &info.invalid_reason {
        field("invalid", reason.clone());
    }
    let budget = settings.worker.delivery_deadline();
    let window = match window(info, crate::clock::now_ms(), budget) {
        Window::Open => match info.first_attempt_ms {
            Some(_) => {
                "open: a replay reuses the Idempotency-Key within Hyperline's 24 h".to_owned()
            }
            None => "never opened: no request that may have charged was made".to_owned(),
        },
        Window::Closed(age) => format!(
            "closed: first attempted {} ago; a replay could charge twice (needs --force)",
            super::human(age)
        ),
        Window::Unknown => "unknown: no first attempt recorded (a replay needs --force)".to_owned(),
        Window::FirstUnknown { before_ms } => format!(
            "may have charged, first request unknown: a delivery to a worker may have been cut \
             short mid-request before {} (dead-letters reconcile; a replay needs --force)",
            crate::clock::rfc3339_ms(before_ms).unwrap_or_else(|| "-".to_owned())
        ),
    };
    field("idempotency", window);
    out.push_str("properties\n");
    for (name, value) in properties(&delivery.properties) {
        let _ = writeln!(out, "  {name:<16}{value}");
    }
    out.push_str("headers\n");
    let mut headers: Vec<(String, String)> = delivery
        .properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), value(v)))
                .collect()
        })
        .unwrap_or_default();
    headers.sort();
    for (name, value) in headers {
        let _ = writeln!(out, "  {name} = {value}");
    }
    out.push_str("body\n");
    let body = serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(&delivery.data).into_owned());
    for line in body.lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// The properties that are set, by their AMQP names.
fn properties(p: &BasicProperties) -> Vec<(&'static str, String)> {
    let text = |s: Option<&lapin::types::ShortString>| s.map(|s| s.as_str().to_owned());
    [
        ("message_id", text(p.message_id().as_ref())),
        ("correlation_id", text(p.correlation_id().as_ref())),
        ("reply_to", text(p.reply_to().as_ref())),
        ("content_type", text(p.content_type().as_ref())),
        ("type", text(p.kind().as_ref())),
        ("app_id", text(p.app_id().as_ref())),
        (
            "timestamp",
            p.timestamp()
                .and_then(|s| crate::clock::rfc3339_ms(s.saturating_mul(1000))),
        ),
        ("delivery_mode", p.delivery_mode().map(|m| m.to_string())),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|v| (name, v)))
    .collect()
}

/// A header value as an operator reads it: text as text, numbers as numbers,
/// tables and arrays (`x-death`) inline; a `…-ms` number also as a date.
fn value(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => {
            match u64::try_from(*n).ok().filter(|ms| *ms > 1_000_000_000_000) {
                Some(ms) => format!("{n} ({})", crate::clock::rfc3339_ms(ms).unwrap_or_default()),
                None => n.to_string(),
            }
        }
        AMQPValue::Timestamp(s) => {
            crate::clock::rfc3339_ms(s.saturating_mul(1000)).unwrap_or_else(|| s.to_string())
        }
        AMQPValue::FieldTable(t) => {
            let mut entries: Vec<String> = t
                .inner()
                .iter()
                .map(|(k, v)| format!("{}: {}", k.as_str(), value(v)))
                .collect();
            entries.sort();
            format!("{{{}}}", entries.join(", "))
        }
        AMQPValue::FieldArray(a) => format!(
            "[{}]",
            a.as_slice()
                .iter()
                .map(value)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("{other:?}"),
    }
}
