//! The worker's binary as a child process: where cargo built it, and its
//! graceful stop (SIGTERM, then a bounded wait for its exit).

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Child;

/// The `credit-purchase-worker` binary of this build. Cargo builds a
/// package's binaries before its integration tests and benches, into the
/// directory above the test's own executable (`target/<profile>/deps/`).
pub fn worker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let binary = profile_dir.join(format!(
        "credit-purchase-worker{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        binary.is_file(),
        "{} is not built: run the tests through cargo",
        binary.display()
    );
    binary
}

/// Sends SIGTERM to `child` and waits for its exit, at most `within`: the
/// stop a container runtime asks for. Panics if it outlives the bound; the
/// caller judges the exit status.
pub async fn terminate(child: &mut Child, within: Duration) -> ExitStatus {
    let pid = child.id().expect("the child is running");
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(signalled.success(), "SIGTERM to {pid}");
    tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("exits within {within:?} of SIGTERM"))
        .expect("exit status")
}
