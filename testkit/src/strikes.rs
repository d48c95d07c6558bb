//! When a chaos run strikes: by progress, never by the clock.
//!
//! A run that strikes every few seconds does the damage it asserts only if
//! its commands last long enough: on a fast machine the cluster chaos run
//! answered its 2,000 commands in 45.7 s, before its graceful stop was due,
//! and failed with every money assertion holding (issue 28, seed
//! 4841001783308837732); on a slow one it struck more often than it meant.
//! So a run is cut into tranches, one more than it has strikes: strike `k` is
//! due once [`Schedule::due`] commands are done, a quarter into tranche `k`,
//! and tranche `k + 1` is not published before strike `k` has happened. The
//! run cannot end before its last strike, and every strike is made with the
//! rest of its tranche still published and unanswered, whatever the speed.
//!
//! Progress is counted in the simulator's ledger (`GET /_sim/ledger`): no
//! broker node a run stops, and no replica it kills, can interrupt that count.

use std::ops::Range;
use std::time::Duration;

use tokio::sync::watch;

/// Where a chaos run of `commands` commands holds its publishing and when
/// it strikes.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    commands: usize,
    strikes: usize,
}

impl Schedule {
    /// `strikes` strikes over `commands` commands; panics unless every
    /// tranche has at least two commands (one done before its strike, one
    /// in flight at it).
    pub fn new(commands: usize, strikes: usize) -> Schedule {
        assert!(
            commands >= 2 * (strikes + 1),
            "{commands} commands are too few for {strikes} strikes"
        );
        Schedule { commands, strikes }
    }

    pub fn strikes(&self) -> usize {
        self.strikes
    }

    /// The commands of tranche `k`, for `k` in `0..=strikes`: tranche `k`
    /// is published once strike `k - 1` has happened.
    pub fn tranche(&self, k: usize) -> Range<usize> {
        let tranches = self.strikes + 1;
        k * self.commands / tranches..(k + 1) * self.commands / tranches
    }

    /// Strike `k` is due once the first `due(k)` commands are done: a
    /// quarter into tranche `k`, the rest of it in flight.
    pub fn due(&self, k: usize) -> usize {
        let tranche = self.tranche(k);
        tranche.start + (tranche.len() / 4).max(1)
    }
}

/// Distinct commands charged so far, from the simulator at `sim_url`
/// (`None` while it does not answer).
pub async fn charged(http: &reqwest::Client, sim_url: &str) -> Option<usize> {
    let ledger: serde_json::Value = http
        .get(format!("{sim_url}/_sim/ledger"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let mut keys: Vec<&str> = ledger["charges"]
        .as_array()?
        .iter()
        .filter_map(|charge| charge["idempotency_key"].as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    Some(keys.len())
}

/// Waits until `n` distinct commands are charged; panics after `within`,
/// naming `what` was waiting.
pub async fn wait_charged(sim_url: &str, n: usize, within: Duration, what: &str) -> usize {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let done = charged(&http, sim_url).await.unwrap_or(0);
        if done >= n {
            return done;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {done} of {n} commands charged after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the count on `watched` reaches `n`; panics after `within`,
/// or when its sender is gone (the task that counted ended first).
pub async fn wait_count(
    watched: &mut watch::Receiver<usize>,
    n: usize,
    within: Duration,
    what: &str,
) {
    match tokio::time::timeout(within, watched.wait_for(|count| *count >= n)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => panic!("{what}: the task that counts it ended first"),
        Err(_) => panic!("{what}: not within {within:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn tranches_cover_the_run_and_each_strike_leaves_work_in_flight() {
        // (commands, strikes, tranche 0, last tranche, due of strike 0, of the last strike)
        let table = [
            (2000, 4, 0..400, 1600..2000, 100, 1300),
            (2000, 17, 0..111, 1888..2000, 27, 1804),
            (10, 4, 0..2, 8..10, 1, 7),
            (11, 2, 0..3, 7..11, 1, 4),
        ];
        for (commands, strikes, first, last, first_due, last_due) in table {
            let s = Schedule::new(commands, strikes);
            assert_eq!(s.tranche(0), first, "{commands}/{strikes}");
            assert_eq!(s.tranche(strikes), last, "{commands}/{strikes}");
            assert_eq!(s.due(0), first_due, "{commands}/{strikes}");
            assert_eq!(s.due(strikes - 1), last_due, "{commands}/{strikes}");
            let mut next = 0;
            for k in 0..=strikes {
                let tranche = s.tranche(k);
                assert_eq!(tranche.start, next, "contiguous: {commands}/{strikes}");
                next = tranche.end;
                if k < strikes {
                    let due = s.due(k);
                    assert!(
                        tranche.start < due && due < tranche.end,
                        "strike {k} of {commands}/{strikes}: due {due} in {tranche:?}"
                    );
                }
            }
            assert_eq!(next, commands, "every command in a tranche");
        }
    }

    #[test]
    #[should_panic(expected = "too few")]
    fn a_tranche_of_one_command_is_refused() {
        Schedule::new(9, 4);
    }
}
