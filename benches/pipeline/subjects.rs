//! The measured processes, and who they are in a run.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

/// A measured process: a worker replica or the baseline loop.
pub struct Subject {
    child: Child,
    pub pid: u32,
}

impl Subject {
    pub fn spawn(mut cmd: Command, log_name: &str) -> Result<Subject> {
        // `BENCH_LOGS` moves the subjects' logs off the broker's disk (e.g. to
        // a tmpfs).
        let dir = std::env::var_os("BENCH_LOGS").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cpw-bench"),
            std::path::PathBuf::from,
        );
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join(format!("{log_name}.log")))?;
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CPW__") || k == "CPW_CONFIG")
        {
            cmd.env_remove(k);
        }
        // A process group of its own, so that stopping it also stops what a
        // `BENCH_WRAP` wrapper started.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {log_name}"))?;
        let pid = child.id().context("no pid")?;
        Ok(Subject { child, pid })
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pid)])
            .status();
        let _ = self.child.kill().await;
    }
}

/// Who is measured in a run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Who {
    /// The worker with its default configuration (logs at info).
    Worker,
    /// The worker with `log.level` warn: what the logs cost.
    WorkerWarn,
    Baseline,
}
