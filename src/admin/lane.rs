//! A dead letter's lane: where `dead-letters replay` and `reconcile
//! --apply` put it back.
//!
//! A letter names the queue it was consumed from or died in: the worker's
//! `cpw-queue` stamp, else the broker's `x-death` (see
//! [`inspect`](super::letter::inspect)). It goes back to the lane of that
//! queue and no other, so a replayed checkout does not wait behind a bulk
//! import, nor a replayed import take an interactive lane's share. A letter
//! whose queue is no configured lane's (it died before the lanes were set,
//! or its lane has been removed since) is never lost: it goes to the first
//! lane, and the tool says so on a line of its own.

use crate::broker::{LaneQueues, Topology};

/// The lane a dead letter goes back to.
pub struct Home<'a> {
    /// Its lane, or the first when its queue is no lane's.
    pub lane: &'a LaneQueues,
    /// Whether that is the lane it came from: false for a stray letter.
    pub own: bool,
    /// The queue it names, if any.
    named: Option<String>,
}

/// The lane of the letter that names `queue` (its
/// [`DeadLetterInfo::queue`](super::letter::DeadLetterInfo::queue)).
pub fn home<'a>(topology: &'a Topology, queue: Option<&str>) -> Home<'a> {
    let own = queue.and_then(|queue| topology.lane_of_queue(queue));
    Home {
        lane: own.unwrap_or_else(|| topology.lane(0)),
        own: own.is_some(),
        named: queue.map(str::to_owned),
    }
}

impl Home<'_> {
    /// For a stray letter, the line that says where command `id` went and
    /// why; `None` for a letter back in its own lane.
    pub fn note(&self, id: &str) -> Option<String> {
        if self.own {
            return None;
        }
        let why = match &self.named {
            None => "names no queue".to_owned(),
            Some(queue) => format!("came from `{queue}`, which is no configured lane's queue"),
        };
        Some(format!(
            "note: {id} {why}: put in the first lane, `{}` (`{}`)",
            self.lane.name, self.lane.queue
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::Settings;

    fn topology(lanes: &str) -> Topology {
        let settings =
            Settings::load_from(None, [("CPW__AMQP__LANES".to_owned(), lanes.to_owned())])
                .expect("settings");
        Topology::new(&settings.amqp, &[30])
    }

    #[test]
    fn a_letter_goes_back_to_the_lane_of_its_queue() {
        let t = topology("interactive:4,bulk:1");
        let home = home(&t, Some("credit-purchases.bulk"));
        assert_eq!(home.lane.name, "bulk");
        assert_eq!(home.note("c-1"), None);
    }

    #[test]
    fn a_letter_of_no_lane_goes_to_the_first_and_says_so() {
        let t = topology("interactive:4,bulk:1");
        let old = home(&t, Some("credit-purchases"));
        assert_eq!(old.lane.name, "interactive");
        assert_eq!(
            old.note("c-1").as_deref(),
            Some(
                "note: c-1 came from `credit-purchases`, which is no configured lane's queue: \
                 put in the first lane, `interactive` (`credit-purchases.interactive`)"
            )
        );
        let nameless = home(&t, None);
        assert_eq!(nameless.lane.name, "interactive");
        assert!(
            nameless
                .note("c-2")
                .is_some_and(|n| n.contains("c-2 names no queue")),
        );
    }
}
