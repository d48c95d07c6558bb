//! The worker's stderr: log lines gathered in memory and written by a
//! thread of their own, in batches.
//!
//! Written directly, each line is a `write` system call made on a runtime
//! thread: one per charge at the default level, and a call that can stall
//! that thread (and every command on it) while the disk is busy, as it is
//! on a broker's machine. Here a line only takes a lock and a copy; the
//! writing thread wakes at once for a WARN or ERROR line or a full batch,
//! and otherwise every [`FLUSH_EVERY`]. Nothing is dropped: when the writer
//! falls [`MAX_BUFFERED`] behind, loggers wait for it. What a `SIGKILL`
//! takes is at most the last [`FLUSH_EVERY`] of INFO lines; every line is
//! written when the [`Flush`] guard is dropped.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The longest an INFO line waits to be written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A batch this large is written without waiting for the interval.
const WRITE_AT: usize = 64 * 1024;
/// Loggers wait when this much is still unwritten (a stalled stderr).
pub const MAX_BUFFERED: usize = 4 * 1024 * 1024;

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// A line that should not wait for the interval is pending.
    urgent: bool,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writing thread.
    work: Condvar,
    /// Wakes loggers waiting for room.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves bytes, not broken state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `MakeWriter` of the log layer.
#[derive(Clone)]
pub struct Batched {
    shared: Arc<Shared>,
}

/// Writes what is pending and stops the writing thread when dropped.
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer into the pending batch and the guard that empties it, or an
/// error when the writing thread cannot be started.
pub fn stderr() -> io::Result<(Batched, Flush)> {
    into(io::stderr())
}

fn into<W: Write + Send + 'static>(mut sink: W) -> io::Result<(Batched, Flush)> {
    let shared = Arc::new(Shared::default());
    let writer = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("cpw-logs".to_owned())
        .spawn(move || {
            let mut batch = Vec::new();
            loop {
                let closed = {
                    let mut state = writer.lock();
                    if !state.urgent && !state.closed {
                        state = writer
                            .work
                            .wait_timeout(state, FLUSH_EVERY)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    std::mem::swap(&mut batch, &mut state.pending);
                    state.urgent = false;
                    state.closed
                };
                writer.room.notify_all();
                if !batch.is_empty() {
                    // Nowhere to report a failing stderr; the lines are lost
                    // either way, and the worker goes on.
                    let _ = sink.write_all(&batch).and_then(|()| sink.flush());
                    batch.clear();
                }
                if closed && writer.lock().pending.is_empty() {
                    return;
                }
            }
        })?;
    Ok((
        Batched {
            shared: Arc::clone(&shared),
        },
        Flush {
            shared,
            thread: Some(thread),
        },
    ))
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One line's writer.
pub struct Line<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        while state.pending.len() >= MAX_BUFFERED && !state.closed {
            state = self
                .shared
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.pending.extend_from_slice(buf);
        let wake = self.urgent || state.pending.len() >= WRITE_AT;
        state.urgent |= wake;
        drop(state);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: &self.shared,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        Line {
            shared: &self.shared,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A sink that reports each write, with the time it arrived.
    struct Reporting(mpsc::Sender<(Instant, Vec<u8>)>);

    impl Write for Reporting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.send((Instant::now(), buf.to_vec()));
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn info_lines_wait_for_the_interval_in_one_write_and_warnings_do_not() {
        let (tx, rx) = mpsc::channel();
        let (writer, flush) = into(Reporting(tx)).expect("thread starts");
        let subscriber =
            tracing_subscriber::registry().with(super::super::json_lines::JsonLines::new(writer));
        let started = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..10 {
                tracing::info!(i, "info");
            }
            let (at, batch) = rx.recv_timeout(Duration::from_secs(5)).expect("a batch");
            let text = String::from_utf8(batch).expect("UTF-8");
            assert_eq!(
                text.lines().count(),
                10,
                "one write for the ten lines: {text}"
            );
            assert!(
                at.duration_since(started) >= FLUSH_EVERY / 2,
                "written before the interval"
            );

            let warned = Instant::now();
            tracing::warn!("warn");
            let (at, batch) = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the warning");
            let text = String::from_utf8(batch).expect("UTF-8");
            assert!(text.contains("\"level\":\"WARN\""), "{text}");
            assert!(
                at.duration_since(warned) < FLUSH_EVERY,
                "a warning does not wait"
            );
        });
        drop(flush);
    }

    #[test]
    fn dropping_the_guard_writes_everything() {
        let (tx, rx) = mpsc::channel();
        let (writer, flush) = into(Reporting(tx)).expect("thread starts");
        for i in 0..1000 {
            let _ = writeln!(writer.make_writer(), "line {i}");
        }
        drop(flush);
        let written: Vec<u8> = rx.try_iter().flat_map(|(_, b)| b).collect();
        let text = String::from_utf8(written).expect("UTF-8");
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(text.lines().last(), Some("line 999"));
    }
}
