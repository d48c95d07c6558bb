//! Logs: JSON for pipelines, pretty for people, filtered by `log.level` or
//! `RUST_LOG`. Set up once, first thing, so even a configuration error is
//! reported through the same channel as everything else.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::configuration::LogFormat;

/// Installs the global subscriber; a second call (tests) is a no-op.
/// Colour codes only when stderr is a terminal: a pretty log sent to a
/// file or a pipe stays plain text.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr.with_max_level(tracing::Level::TRACE));
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The filter of `log.level`, with lapin silenced unless the level names
/// it. lapin logs every connection loss itself, at ERROR and two or three
/// times (the close, the channel error, its own recovery giving up); the
/// worker reports the same event once, in its own words, with what it does
/// next. `lapin=debug` in `log.level` (or `RUST_LOG`) brings them back.
fn default_filter(level: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    if level.contains("lapin") {
        return filter;
    }
    match LAPIN_OFF.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// The directive added to `log.level` by default.
const LAPIN_OFF: &str = "lapin=off";

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
    use super::{child_traceparent, push_random_hex};

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
}
