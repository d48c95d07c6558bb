//! The JSON log line: one object per event, the event's fields and the
//! fields of its spans flat at the top level, written with one `write`.
//!
//! Why not a crate's JSON layer: the worker logs one line per charge at the
//! default level, so the line's cost is paid by every command. Measured
//! with callgrind over 3,000 commands (BENCHMARKS.md), the line and its
//! `command` span cost 52,700 instructions per command with
//! tracing-subscriber's JSON format (it re-parses the span's fields as JSON
//! for every line and validates UTF-8 at every small write),
//! 27,000 with `json-subscriber` and 23,500 with `tracing-flat-json` (both
//! build a map of JSON values per line). Here, a span's fields are encoded
//! once, when it is made, and spliced into each line as they are; an event's
//! fields are escaped straight into a reused buffer.
//!
//! Flat at the top level so that a log pipeline finds `command_id` and
//! `invoice_id` side by side without unnesting: the event's own fields
//! first, then the nearest span's, then its parents'. A name seen once is
//! not written again (the nearest value wins), so every line is an object
//! without duplicate keys.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::ops::Range;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The layer; `make_writer` gives the sink of each line.
pub struct JsonLines<W> {
    make_writer: W,
}

impl<W> JsonLines<W> {
    pub fn new(make_writer: W) -> Self {
        Self { make_writer }
    }
}

/// A span's fields, each value already encoded as JSON: the values one
/// after the other in `json`, and where each is. A value recorded again is
/// appended and its range moved; the old bytes stay unused.
#[derive(Default)]
struct SpanFields {
    json: String,
    fields: Vec<(&'static str, Range<usize>)>,
}

impl SpanFields {
    /// Encodes a value with `encode` and files it under `name`.
    fn set(&mut self, name: &'static str, encode: impl FnOnce(&mut String)) {
        let start = self.json.len();
        encode(&mut self.json);
        let range = start..self.json.len();
        match self.fields.iter_mut().find(|(n, _)| *n == name) {
            Some((_, at)) => *at = range,
            None => self.fields.push((name, range)),
        }
    }

    fn members(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.fields
            .iter()
            .map(|(name, at)| (*name, self.json.get(at.clone()).unwrap_or("null")))
    }
}

/// Where encoded field values go: a span's fields or a line.
trait Members {
    /// Files the value of `name`, encoded by `encode`, or skips it.
    fn member(&mut self, name: &'static str, encode: impl FnOnce(&mut String));
}

impl Members for SpanFields {
    fn member(&mut self, name: &'static str, encode: impl FnOnce(&mut String)) {
        self.set(name, encode);
    }
}

/// Encodes each field recorded as JSON into `M`.
struct Encode<'a, M>(&'a mut M);

impl<M: Members> Visit for Encode<'_, M> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.member(field.name(), |out| debug_value(out, value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.member(field.name(), |out| string_value(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.member(field.name(), |out| {
            if value < 0 {
                out.push('-');
            }
            integer_value(out, value.unsigned_abs());
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.member(field.name(), |out| integer_value(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0
            .member(field.name(), |out| out.push_str(bool_value(value)));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.member(field.name(), |out| f64_value(out, value));
    }
}

/// A line being written: the buffer and the names already in it.
struct Line<'a> {
    out: &'a mut String,
    names: &'a mut Vec<&'static str>,
    /// The event is a `log` record: its `log.*` fields are in the metadata.
    from_log: bool,
}

impl Members for Line<'_> {
    /// Writes `"name":value`, unless `name` is already in the line (or is
    /// a `log` record's own field).
    fn member(&mut self, name: &'static str, encode: impl FnOnce(&mut String)) {
        if self.names.contains(&name) || (self.from_log && name.starts_with("log.")) {
            return;
        }
        self.names.push(name);
        self.out.push(',');
        string_value(self.out, name);
        self.out.push(':');
        encode(self.out);
    }
}

thread_local! {
    /// The line under construction and its names, reused: no allocation
    /// per line once they have grown to the longest line of their thread.
    static BUFFER: RefCell<(String, Vec<&'static str>)> =
        const { RefCell::new((String::new(), Vec::new())) };
}

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        // Sized for the `command` span's ids: no regrowth while recording.
        let mut fields = SpanFields {
            json: String::with_capacity(256),
            fields: Vec::with_capacity(attrs.fields().len()),
        };
        attrs.record(&mut Encode(&mut fields));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            values.record(&mut Encode(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let write = |(out, names): &mut (String, Vec<&'static str>)| {
            out.clear();
            names.clear();
            // A record of the `log` crate names its own target in fields.
            let normalized = event.normalized_metadata();
            let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
            out.push_str("{\"timestamp\":\"");
            let mut stamp = [0u8; 40];
            let mut cursor = &mut stamp[..];
            if OffsetDateTime::now_utc()
                .format_into(&mut cursor, &Rfc3339)
                .is_ok()
            {
                let written = 40 - cursor.len();
                out.push_str(std::str::from_utf8(&stamp[..written]).unwrap_or_default());
            }
            out.push_str("\",\"level\":\"");
            out.push_str(metadata.level().as_str());
            out.push('"');
            let mut line = Line {
                out,
                names,
                from_log: normalized.is_some(),
            };
            line.member("target", |out| string_value(out, metadata.target()));
            event.record(&mut Encode(&mut line));
            if let Some(scope) = ctx.event_scope(event) {
                for span in scope {
                    if let Some(fields) = span.extensions().get::<SpanFields>() {
                        for (name, json) in fields.members() {
                            line.member(name, |out| out.push_str(json));
                        }
                    }
                }
            }
            line.out.push_str("}\n");
            let _ = self
                .make_writer
                .make_writer_for(metadata)
                .write_all(line.out.as_bytes());
        };
        // Should a line ever be logged while one is written on this thread
        // (tracing drops such events today), it gets a buffer of its own
        // instead of a panic.
        let reused = BUFFER.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut out) => {
                write(&mut out);
                true
            }
            Err(_) => false,
        });
        if !reused {
            write(&mut (String::new(), Vec::new()));
        }
    }
}

/// `value` as a JSON string: quoted, with `"`, `\` and control characters
/// escaped.
fn string_value(out: &mut String, value: &str) {
    out.push('"');
    escape_into(out, value);
    out.push('"');
}

/// A `Debug` value (a `%` field is its `Display` through `Debug`) as a JSON
/// string, escaped as it is formatted.
fn debug_value(out: &mut String, value: &dyn fmt::Debug) {
    out.push('"');
    let _ = write!(Escaping(out), "{value:?}");
    out.push('"');
}

/// `value` in decimal, without `fmt`'s machinery: every charge's line has
/// two numbers (BENCHMARKS.md, issue 30).
fn integer_value(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        if let Some(digit) = digits.get_mut(start) {
            *digit = b'0' + (value % 10) as u8;
        }
        value /= 10;
        if value == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(digits.get(start..).unwrap_or_default()).unwrap_or_default());
}

/// JSON has no NaN or infinity: those are `null`.
fn f64_value(out: &mut String, value: f64) {
    if value.is_finite() {
        let _ = write!(out, "{value}");
    } else {
        out.push_str("null");
    }
}

/// A `fmt::Write` that escapes what is written for a JSON string.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

fn bool_value(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

/// The bytes a JSON string cannot hold as they are.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Copies `s` in runs between the bytes that need escaping (all ASCII, so
/// every cut is a character boundary).
fn escape_into(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    while let Some(offset) = bytes
        .get(start..)
        .and_then(|rest| rest.iter().position(|b| NEEDS_ESCAPE[usize::from(*b)]))
    {
        let at = start + offset;
        out.push_str(s.get(start..at).unwrap_or_default());
        match bytes.get(at).copied().unwrap_or_default() {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            control => {
                let _ = write!(out, "\\u{control:04x}");
            }
        }
        start = at + 1;
    }
    out.push_str(s.get(start..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{Map, Value, json};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// The lines written while `f` runs, parsed.
    fn lines(f: impl FnOnce()) -> Vec<Map<String, Value>> {
        let sink = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let sink = Arc::clone(&sink);
            move || Sink(Arc::clone(&sink))
        };
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(writer));
        tracing::subscriber::with_default(subscriber, f);
        let bytes = sink.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes)
            .expect("UTF-8")
            .lines()
            .map(|line| match serde_json::from_str(line) {
                Ok(Value::Object(map)) => map,
                other => panic!("not one JSON object: {line} ({other:?})"),
            })
            .collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut sink) = self.0.lock() {
                sink.extend_from_slice(buf);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_event_and_its_spans_fields_are_flat_in_one_object() {
        let got = lines(|| {
            let outer = tracing::info_span!("outer", replica = "r1", attempt = 9_u32);
            let _outer = outer.enter();
            let span = tracing::info_span!("command", command_id = "c-1", attempt = 2_u32);
            let _span = span.enter();
            tracing::info!(invoice_id = %"inv_1", attempts = 1_u32, "credits purchased");
        });
        assert_eq!(got.len(), 1);
        let line = &got[0];
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "credits purchased");
        assert_eq!(line["invoice_id"], "inv_1");
        assert_eq!(line["attempts"], 1);
        assert_eq!(line["command_id"], "c-1");
        assert_eq!(line["replica"], "r1");
        assert_eq!(line["attempt"], 2, "the nearest span wins");
        assert!(
            line["target"]
                .as_str()
                .is_some_and(|t| t.contains("json_lines"))
        );
        assert!(
            line["timestamp"]
                .as_str()
                .is_some_and(|t| time::OffsetDateTime::parse(t, &Rfc3339).is_ok()),
            "{line:?}"
        );
    }

    #[test]
    fn names_appear_once_even_when_event_and_span_share_them() {
        let sink = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let sink = Arc::clone(&sink);
            move || Sink(Arc::clone(&sink))
        };
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(writer));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("s", status = "span");
            let _span = span.enter();
            tracing::warn!(status = "event", "x");
        });
        let raw =
            String::from_utf8(sink.lock().map(|b| b.clone()).unwrap_or_default()).expect("UTF-8");
        assert_eq!(raw.matches("\"status\"").count(), 1, "{raw}");
        assert!(raw.contains("\"status\":\"event\""), "{raw}");
    }

    #[test]
    fn values_are_escaped_and_typed() {
        let hostile = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} é 🦀";
        let got = lines(|| {
            let span = tracing::info_span!("s", later = tracing::field::Empty);
            span.record("later", "recorded");
            let _span = span.enter();
            tracing::error!(
                text = hostile,
                shown = %hostile,
                debugged = ?hostile,
                negative = -3_i64,
                smallest = i64::MIN,
                zero = 0_u64,
                big = u64::MAX,
                yes = true,
                ratio = 0.5_f64,
                nan = f64::NAN,
                "{hostile}"
            );
        });
        let line = &got[0];
        assert_eq!(line["text"], hostile);
        assert_eq!(line["shown"], hostile);
        assert_eq!(line["debugged"], format!("{hostile:?}"));
        assert_eq!(line["message"], hostile);
        assert_eq!(line["negative"], -3);
        assert_eq!(line["smallest"], json!(i64::MIN));
        assert_eq!(line["zero"], 0);
        assert_eq!(line["big"], json!(u64::MAX));
        assert_eq!(line["yes"], true);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["nan"], Value::Null);
        assert_eq!(line["later"], "recorded");
    }

    #[test]
    fn a_record_of_the_log_crate_keeps_its_own_target() {
        let record = log::Record::builder()
            .args(format_args!("from log"))
            .level(log::Level::Warn)
            .target("some_crate::module")
            .build();
        let got = lines(|| tracing_log::format_trace(&record).expect("dispatched"));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["target"], "some_crate::module");
        assert_eq!(got[0]["level"], "WARN");
        assert_eq!(got[0]["message"], "from log");
        assert!(
            got[0].keys().all(|k| !k.starts_with("log.")),
            "{:?}",
            got[0]
        );
    }

    #[test]
    fn a_value_that_logs_while_it_is_formatted_leaves_its_line_whole() {
        /// A value whose formatting logs (tracing drops that inner event:
        /// the dispatcher is busy with the outer one).
        struct Logs;

        impl fmt::Debug for Logs {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                tracing::info!("inner");
                f.write_str("outer value")
            }
        }

        let got = lines(|| tracing::info!(value = ?Logs, "outer"));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["message"], "outer");
        assert_eq!(got[0]["value"], "outer value");
    }
}
