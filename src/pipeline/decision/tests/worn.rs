//! Worn deliveries and requests no history records: a delivery killed
//! mid-request records nothing, so a refreshed command may have charged
//! before its refresh, and its first request is unknown.

use super::*;
use crate::hyperline::matching::ChargeLookup;

/// A refresh's moment, in the tests.
const REFRESHED: u64 = NOW - 2 * HOUR;

fn worn(h: DeliveryHistory) -> DeliveryHistory {
    DeliveryHistory {
        deliveries: 10,
        ..h
    }
}

/// What each refresh and the poison letter remember.
#[test]
fn a_refresh_records_that_a_request_may_have_been_made_before_it() {
    let mut h = worn(DeliveryHistory::default());
    let mut at = NOW;
    for refreshes in 1..=MAX_REFRESHES {
        let policy = Policy {
            now_ms: at,
            ..policy()
        };
        let plan = decide(Input::Worn, &h, policy);
        assert_eq!(plan.outcome, Outcome::Returned("refreshed"));
        assert_eq!(plan.history.refreshes, refreshes);
        // The earliest refresh is the bound: a request may have been made
        // before it, and kept so through later refreshes.
        assert_eq!(plan.history.unrecorded_before_ms, Some(NOW), "{refreshes}");
        assert_eq!(plan.history.first_attempt_ms, None, "no request recorded");
        h = worn(plan.history);
        at += 60_000;
    }
    let poison = decide(Input::Worn, &h, policy());
    assert_eq!(poison.route, Route::CopyToDlx(ErrorCode::RetriesExhausted));
    assert_eq!(poison.history.unrecorded_before_ms, Some(NOW));
    let Some(EventPlan::Failed { message, .. }) = &poison.event else {
        panic!("a failed event: {poison:?}")
    };
    assert!(message.contains("first request unknown"), "{message}");
    assert!(!message.contains("no request"), "{message}");

    // Worn at its first delivery too: the poison letter knows it.
    let first_worn = DeliveryHistory {
        refreshes: MAX_REFRESHES,
        ..worn(DeliveryHistory::default())
    };
    let plan = decide(Input::Worn, &first_worn, policy());
    assert_eq!(plan.history.unrecorded_before_ms, Some(NOW));
}

/// (first recorded, unrecorded before, published) and the start they give.
type Row = (Option<u64>, Option<u64>, Option<u64>, WindowStart);

/// The window's start as the guard counts it, for every combination of what
/// the history records, what it does not, and the publisher's timestamp.
#[test]
fn the_guard_counts_the_window_from_the_earliest_possible_first_request() {
    let (first, published) = (NOW - HOUR, NOW - 3 * HOUR);
    let rows: [Row; 9] = [
        // (first recorded, unrecorded before, published) -> start
        (None, None, None, WindowStart::NotYet),
        (Some(first), None, None, WindowStart::From(first)),
        // A timestamp alone changes nothing: the recorded request is the first.
        (None, None, Some(published), WindowStart::NotYet),
        (Some(first), None, Some(published), WindowStart::From(first)),
        (
            None,
            Some(REFRESHED),
            None,
            WindowStart::Unknown {
                before_ms: REFRESHED,
            },
        ),
        (
            Some(first),
            Some(REFRESHED),
            None,
            WindowStart::Unknown {
                before_ms: REFRESHED,
            },
        ),
        // No request precedes the publication: the earliest it can be.
        (
            None,
            Some(REFRESHED),
            Some(published),
            WindowStart::From(published),
        ),
        (
            Some(published - HOUR),
            Some(REFRESHED),
            Some(published),
            WindowStart::From(published - HOUR),
        ),
        // Published after a request may have been made: impossible, bounds
        // nothing.
        (
            None,
            Some(REFRESHED),
            Some(REFRESHED + 1),
            WindowStart::Unknown {
                before_ms: REFRESHED,
            },
        ),
    ];
    for (first_attempt_ms, unrecorded_before_ms, published_ms, start) in rows {
        let h = DeliveryHistory {
            first_attempt_ms,
            unrecorded_before_ms,
            published_ms,
            ..DeliveryHistory::default()
        };
        assert_eq!(window_start(&h), start, "{h:?}");
    }
}

/// With no bound on its first request, the command is answered without
/// another request, and its letter knows why.
#[test]
fn a_start_nothing_bounds_dead_letters_without_a_request() {
    let h = DeliveryHistory {
        unrecorded_before_ms: Some(REFRESHED),
        refreshes: 1,
        ..DeliveryHistory::default()
    };
    let plan = decide(
        Input::StartUnknown {
            before_ms: REFRESHED,
        },
        &h,
        policy(),
    );
    assert_eq!(plan.route, Route::CopyToDlx(ErrorCode::RetriesExhausted));
    assert_eq!(plan.history.unrecorded_before_ms, Some(REFRESHED));
    assert_eq!(plan.history.attempts, 0);
    let Some(EventPlan::Failed { message, .. }) = &plan.event else {
        panic!("a failed event: {plan:?}")
    };
    for words in [
        "first request unknown",
        "`timestamp`",
        "dead-letters reconcile",
    ] {
        assert!(message.contains(words), "{words}: {message}");
    }
}

/// After a refresh, a command sent back for another purchase is answered
/// when the window counted from its publication would close first, though
/// the request it recorded is recent.
#[test]
fn after_a_refresh_the_window_is_counted_from_the_publication() {
    let exhausted = || {
        Input::Attempted(Attempted {
            verdict: Verdict::Exhausted {
                last_status: Some(503),
                last_error: "HTTP 503".into(),
            },
            requests: 1,
            first_sent_ms: Some(NOW - 1_000),
            last_sent_ms: Some(NOW - 1_000),
            last_status: Some(503),
        })
    };
    let published = NOW - 24 * HOUR + 60_000;
    let plain = DeliveryHistory {
        published_ms: Some(published),
        ..DeliveryHistory::default()
    };
    let plan = decide(exhausted(), &plain, policy());
    assert_eq!(
        plan.route,
        Route::Delay(0),
        "a timestamp alone bounds nothing"
    );

    let refreshed = DeliveryHistory {
        unrecorded_before_ms: Some(REFRESHED),
        ..plain
    };
    let plan = decide(exhausted(), &refreshed, policy());
    assert_eq!(plan.route, Route::CopyToDlx(ErrorCode::RetriesExhausted));
    assert_eq!(plan.closed_window, Some(published));
    let Some(EventPlan::Failed { message, .. }) = &plan.event else {
        panic!("a failed event: {plan:?}")
    };
    assert!(message.contains("first request unknown"), "{message}");
}

/// "Not charged" since the window's start covers requests no history
/// records: the command starts again as new, with nothing unknown left.
#[test]
fn no_charge_found_forgets_the_unrecorded_requests() {
    let h = DeliveryHistory {
        unrecorded_before_ms: Some(REFRESHED),
        published_ms: Some(NOW - 25 * HOUR),
        ..DeliveryHistory::default()
    };
    let attempted = super::at_the_window::refused_at_window();
    let input = Input::Looked {
        attempted,
        lookup: ChargeLookup::NotCharged,
    };
    let plan = decide(input, &h, policy());
    assert_eq!(plan.route, Route::Return);
    assert_eq!(plan.history.unrecorded_before_ms, None);
    assert_eq!(window_start(&plan.history), WindowStart::NotYet);
}
