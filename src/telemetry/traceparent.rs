//! The W3C `traceparent` a command carries through the worker.
//!
//! With an exporter, each hop is a real span: the consumer span continues
//! the publisher's trace ([`continue_trace`]), and the request and the event
//! carry the `traceparent` of their own exported span
//! ([`exported_traceparent`]). Without one, the worker still continues the
//! trace with one made-up span id for its hop ([`child_traceparent`]), so
//! the publisher's trace id reaches Hyperline and the event consumers.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

/// A carrier holding one `traceparent`, in or out.
#[derive(Default)]
struct Carrier<'a> {
    incoming: Option<&'a str>,
    outgoing: Option<String>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.incoming.filter(|_| key == TRACEPARENT)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.outgoing = Some(value);
        }
    }
}

/// Makes `span` (an export span) the child of the publisher's span named by
/// `incoming`, or the root of a new trace when it names none, and returns
/// its `traceparent`. `None` when the span is not exported (no exporter).
pub fn continue_trace(span: &tracing::Span, incoming: Option<&str>) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let parent = TraceContextPropagator::new().extract(&Carrier {
        incoming,
        outgoing: None,
    });
    if parent.span().span_context().is_valid() {
        // Fails only for a span already started, which this one is not.
        let _ = span.set_parent(parent);
    }
    exported_traceparent(span)
}

/// The `traceparent` naming `span`, when it is exported.
pub fn exported_traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let context: Context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier::default();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.outgoing
}

/// The trace id of a `traceparent` whose sampled flag is set: what a
/// metric's exemplar links to (an unsampled trace is not stored anywhere).
pub fn sampled_trace_id(traceparent: &str) -> Option<&str> {
    let flags = traceparent.get(53..55)?;
    let sampled = u8::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1);
    sampled.then(|| traceparent.get(3..35)).flatten()
}

/// The W3C `traceparent` to send on for a command: the same trace as the
/// publisher's (when it sent a valid one), with a new span id for the
/// worker's hop, so a trace crosses the worker; a fresh trace otherwise.
/// Built in one allocation: it runs for every command.
pub fn child_traceparent(incoming: Option<&str>) -> String {
    let mut out = String::with_capacity(TRACEPARENT_LEN);
    out.push_str("00-");
    match incoming.and_then(trace_of) {
        Some((trace, flags)) => {
            out.push_str(trace);
            out.push('-');
            push_random_hex(&mut out, 16);
            out.push('-');
            out.push_str(flags);
        }
        None => {
            push_random_hex(&mut out, 32);
            out.push('-');
            push_random_hex(&mut out, 16);
            out.push_str("-01");
        }
    }
    out
}

/// `00-` + 32 + `-` + 16 + `-` + 2.
const TRACEPARENT_LEN: usize = 55;

/// The trace id and flags of a valid version-00-compatible `traceparent`.
fn trace_of(traceparent: &str) -> Option<(&str, &str)> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let valid = parts.next().is_none()
        && hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0');
    valid.then_some((trace, flags))
}

/// Appends a random id of `digits` lower-case hex digits (at most 32),
/// never all zeros (W3C: an all-zero trace or span id is invalid). Drawn
/// from the thread's CSPRNG: `Uuid::new_v4` asks the kernel, a system call
/// for each of the two ids of every command.
fn push_random_hex(out: &mut String, digits: usize) {
    let shift = 128 - 4 * digits as u32;
    let id = loop {
        let id = rand::random::<u128>() >> shift;
        if id != 0 {
            break id;
        }
    };
    for i in (0..digits).rev() {
        let nibble = (id >> (4 * i)) & 0xf;
        out.push(char::from(b"0123456789abcdef"[nibble as usize]));
    }
}

#[cfg(test)]
mod tests {
    use super::{child_traceparent, push_random_hex, sampled_trace_id};

    fn random_hex(digits: usize) -> String {
        let mut id = String::new();
        push_random_hex(&mut id, digits);
        id
    }

    #[test]
    fn random_ids_are_lower_case_hex_of_their_length() {
        for digits in [16, 32] {
            let ids: Vec<String> = (0..100).map(|_| random_hex(digits)).collect();
            assert!(ids.iter().all(|id| {
                id.len() == digits
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    && id.bytes().any(|b| b != b'0')
            }));
            assert!(ids.windows(2).any(|w| w[0] != w[1]), "random");
        }
    }

    #[test]
    fn a_valid_traceparent_keeps_its_trace_with_a_new_span() {
        let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let out = child_traceparent(Some(incoming));
        let parts: Vec<&str> = out.split('-').collect();
        assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c");
        assert_ne!(parts[2], "b7ad6b7169203331");
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }

    #[test]
    fn an_absent_or_invalid_traceparent_starts_a_trace() {
        for incoming in [
            None,
            Some("garbage"),
            Some("00-00000000000000000000000000000000-b7ad6b7169203331-01"),
            Some("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01\r\nX: y"),
        ] {
            let out = child_traceparent(incoming);
            let parts: Vec<&str> = out.split('-').collect();
            assert_eq!(parts.len(), 4, "{out}");
            assert_eq!(
                (parts[0], parts[1].len(), parts[2].len()),
                ("00", 32, 16),
                "{out}"
            );
        }
    }

    #[test]
    fn only_a_sampled_trace_gives_an_exemplar() {
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let sampled = format!("00-{trace}-b7ad6b7169203331-01");
        assert_eq!(sampled_trace_id(&sampled), Some(trace));
        let unsampled = format!("00-{trace}-b7ad6b7169203331-00");
        assert_eq!(sampled_trace_id(&unsampled), None);
        assert_eq!(sampled_trace_id("00-short"), None);
    }
}
