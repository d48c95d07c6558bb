//! What the subcommands print on stdout, written so that a reader that went
//! away is a normal end.
//!
//! `println!` panics when stdout is closed ("failed printing to stdout:
//! Broken pipe", exit 101), which is exactly what `dead-letters list | head -1`
//! or `publish … | grep -q` does once it has what it wants. Output goes
//! through [`line`] instead: the first failed write closes our side of stdout
//! too, the rest of the output is dropped, and the subcommand ends as it would
//! have (its work is never cut short by the reader).

use std::fmt::Display;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout failed: nothing more is written.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` and a newline to stdout, unless stdout is gone.
pub fn line(text: impl Display) {
    write(format_args!("{text}\n"));
}

/// Writes `text` as it is (a block that ends in its own newline).
pub fn block(text: impl Display) {
    write(format_args!("{text}"));
}

fn write(args: std::fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        CLOSED.store(true, Ordering::Relaxed);
        // A closed pipe is the reader's choice; anything else (a full
        // disk) is worth one line where the operator still looks.
        if e.kind() != io::ErrorKind::BrokenPipe {
            let _ = writeln!(io::stderr(), "cannot write to stdout: {e}");
        }
    }
}
