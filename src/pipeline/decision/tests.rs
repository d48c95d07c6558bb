//! The table of docs/contract.md section 4, row by row, for every kind of history:
//! a first delivery, one after delay steps, and one whose idempotency
//! window is over by the time it could come back.

use std::time::Duration;

use super::*;
use crate::contract::{EventError, EventKind};
use crate::hyperline::{FinalAnswer, Receipt};

const NOW: u64 = 1_800_000_000_000;
const HOUR: u64 = 3_600_000;
const DELAYS: [u64; 3] = [30, 300, 30];

fn policy() -> Policy<'static> {
    Policy {
        delays: &DELAYS,
        window: Duration::from_secs(24 * 3600),
        request_timeout: Duration::from_secs(30),
        now_ms: NOW,
    }
}

/// The kinds of history every row is checked against.
#[derive(Clone, Copy, Debug)]
enum Case {
    First,
    AfterSteps,
    PastWindow,
}

const CASES: [Case; 3] = [Case::First, Case::AfterSteps, Case::PastWindow];

fn history(case: Case) -> DeliveryHistory {
    match case {
        Case::First => DeliveryHistory::default(),
        Case::AfterSteps => DeliveryHistory {
            attempts: 8,
            first_attempt_ms: Some(NOW - HOUR),
            step: 2,
            ..DeliveryHistory::default()
        },
        Case::PastWindow => DeliveryHistory {
            attempts: 20,
            first_attempt_ms: Some(NOW - 24 * HOUR + 60_000),
            step: 1,
            ..DeliveryHistory::default()
        },
    }
}

fn attempted(verdict: Verdict, requests: u32, status: Option<u16>) -> Input {
    Input::Attempted(Attempted {
        verdict,
        requests,
        first_sent_ms: Some(NOW - 1_000),
        last_sent_ms: Some(NOW - 500),
        last_status: status,
    })
}

fn failed_code(plan: &Plan) -> Option<ErrorCode> {
    match &plan.event {
        Some(EventPlan::Failed { code, .. }) => Some(*code),
        _ => None,
    }
}

/// The plan of a command whose window is over: answered, never sent back.
fn assert_window_closed(plan: &Plan, case: Case) {
    assert_eq!(
        failed_code(plan),
        Some(ErrorCode::RetriesExhausted),
        "{case:?}"
    );
    assert_eq!(plan.route, Route::CopyToDlx(ErrorCode::RetriesExhausted));
    let Some(EventPlan::Failed { message, .. }) = &plan.event else {
        unreachable!()
    };
    assert!(message.contains("charge twice"), "{message}");
}

#[test]
fn a_201_publishes_succeeded_then_acks() {
    for case in CASES {
        let h = history(case);
        let receipt = Receipt {
            invoice_id: "inv_1".into(),
            new_credit_balance: 32,
        };
        let plan = decide(
            attempted(
                Verdict::Answered(FinalAnswer::Succeeded(receipt)),
                1,
                Some(201),
            ),
            &h,
            policy(),
        );
        assert_eq!(
            plan.event,
            Some(EventPlan::Succeeded {
                invoice_id: "inv_1".into(),
                new_credit_balance: 32
            }),
            "{case:?}"
        );
        assert_eq!((plan.route, plan.outcome), (Route::Ack, Outcome::Succeeded));
        assert_eq!(plan.history.attempts, h.attempts + 1, "attempts add up");
        assert_eq!(
            plan.history.first_attempt_ms,
            h.first_attempt_ms.or(Some(NOW - 1_000)),
            "the window's start is never moved"
        );
    }
}

#[test]
fn final_refusals_publish_failed_then_ack() {
    for case in CASES {
        for status in [400, 404, 422] {
            let verdict = Verdict::Answered(FinalAnswer::Rejected {
                status,
                message: "customer not found".into(),
            });
            let plan = decide(
                attempted(verdict, 1, Some(status)),
                &history(case),
                policy(),
            );
            assert_eq!(
                plan.event,
                Some(EventPlan::Failed {
                    code: ErrorCode::Rejected,
                    message: "customer not found".into(),
                    http_status: Some(status)
                }),
                "{case:?}"
            );
            assert_eq!(plan.route, Route::Ack);
        }
        let verdict = Verdict::Answered(FinalAnswer::IdempotencyConflict {
            message: "reused".into(),
        });
        let plan = decide(attempted(verdict, 1, Some(417)), &history(case), policy());
        assert_eq!(failed_code(&plan), Some(ErrorCode::IdempotencyConflict));
        assert_eq!(plan.route, Route::Ack);
    }
}

#[test]
fn undocumented_answers_dead_letter_with_their_status() {
    for case in CASES {
        for status in [201, 302, 307, 418] {
            let verdict = Verdict::Answered(FinalAnswer::UnexpectedResponse {
                status,
                detail: "an undocumented status".into(),
            });
            let plan = decide(
                attempted(verdict, 1, Some(status)),
                &history(case),
                policy(),
            );
            let Some(EventPlan::Failed {
                code, http_status, ..
            }) = &plan.event
            else {
                panic!("{case:?}: no failed event")
            };
            assert_eq!(
                (*code, *http_status),
                (ErrorCode::UnexpectedResponse, Some(status))
            );
            assert_eq!(plan.route, Route::CopyToDlx(ErrorCode::UnexpectedResponse));
        }
    }
}

#[test]
fn transient_failures_use_the_next_step_then_dead_letter() {
    for case in CASES {
        let h = history(case);
        let verdict = Verdict::Exhausted {
            last_status: Some(503),
            last_error: "HTTP 503".into(),
        };
        let plan = decide(attempted(verdict, 4, Some(503)), &h, policy());
        match case {
            Case::First => {
                assert_eq!(plan.event, None);
                assert_eq!(plan.route, Route::Delay(0));
                assert_eq!(plan.outcome, Outcome::Deferred(1));
                assert_eq!(plan.history.step, 1);
                assert_eq!(plan.history.first_attempt_ms, Some(NOW - 1_000));
            }
            Case::AfterSteps => {
                // Steps 1 and 2 used: the third (a repeated 30 s) is next.
                assert_eq!(plan.route, Route::Delay(2));
                assert_eq!(plan.history.step, 3);
                let last = decide(
                    attempted(
                        Verdict::Exhausted {
                            last_status: Some(503),
                            last_error: "HTTP 503".into(),
                        },
                        4,
                        Some(503),
                    ),
                    &plan.history,
                    policy(),
                );
                let Some(EventPlan::Failed {
                    code,
                    http_status,
                    message,
                }) = &last.event
                else {
                    panic!("no failed event past the last step")
                };
                assert_eq!(
                    (*code, *http_status),
                    (ErrorCode::RetriesExhausted, Some(503))
                );
                assert!(message.contains("gave up after 16 attempts"), "{message}");
                assert_eq!(last.route, Route::CopyToDlx(ErrorCode::RetriesExhausted));
            }
            Case::PastWindow => assert_window_closed(&plan, case),
        }
    }
}

#[test]
fn a_credential_fault_returns_the_command_with_its_history_and_no_event() {
    for case in CASES {
        let h = history(case);
        let plan = decide(
            attempted(Verdict::CredentialFault, 1, Some(401)),
            &h,
            policy(),
        );
        match case {
            Case::PastWindow => assert_window_closed(&plan, case),
            _ => {
                assert_eq!(plan.event, None, "{case:?}");
                assert_eq!(plan.route, Route::Return);
                assert!(plan.credential_fault, "{case:?}");
                assert_eq!(plan.outcome, Outcome::Returned("credential_fault"));
                assert_eq!(plan.history.attempts, h.attempts + 1);
                assert_eq!(plan.history.step, h.step, "no step used");
            }
        }
    }
}

#[test]
fn a_long_rate_limit_parks_without_a_step() {
    for case in CASES {
        let h = history(case);
        let wait = Duration::from_secs(70);
        let plan = decide(
            attempted(Verdict::RateLimited { wait }, 1, Some(429)),
            &h,
            policy(),
        );
        match case {
            Case::PastWindow => assert_window_closed(&plan, case),
            _ => {
                // The shortest delay that outlasts the wait.
                assert_eq!(plan.route, Route::Delay(1));
                assert_eq!(plan.history.step, h.step, "no step used");
                assert_eq!(plan.outcome, Outcome::Returned("rate_limited"));
            }
        }
        let hours = Duration::from_secs(5 * 3600);
        let plan = decide(
            attempted(Verdict::RateLimited { wait: hours }, 1, Some(429)),
            &history(Case::First),
            policy(),
        );
        assert_eq!(
            plan.route,
            Route::Delay(1),
            "the longest delay, again and again"
        );
    }
}

#[test]
fn a_delivery_held_by_the_gate_parks_without_a_step() {
    for case in CASES {
        let h = history(case);
        let verdict = Verdict::Held {
            paused_for: Duration::from_secs(10),
        };
        let plan = decide(attempted(verdict, 0, None), &h, policy());
        match case {
            Case::PastWindow => assert_window_closed(&plan, case),
            _ => {
                assert_eq!((plan.route, plan.history.step), (Route::Delay(0), h.step));
                assert_eq!(plan.history.attempts, h.attempts);
            }
        }
    }
}

#[test]
fn the_window_closing_answers_retries_exhausted() {
    for case in CASES {
        let verdict = Verdict::WindowClosed {
            first_attempt_ms: NOW - 24 * HOUR,
        };
        let plan = decide(attempted(verdict, 0, None), &history(case), policy());
        assert_window_closed(&plan, case);
    }
}

#[test]
fn an_interrupted_delivery_goes_back_with_what_it_learned() {
    let plan = decide(
        attempted(Verdict::Interrupted, 1, None),
        &history(Case::First),
        policy(),
    );
    assert_eq!((plan.route, plan.event), (Route::Return, None));
    assert_eq!(plan.history.first_attempt_ms, Some(NOW - 1_000));
    assert_eq!(plan.history.attempts, 1);
}

#[test]
fn an_invalid_command_dead_letters_with_its_event() {
    for case in CASES {
        let plan = decide(Input::Invalid, &history(case), policy());
        assert_eq!(plan.event, Some(EventPlan::Invalid));
        assert_eq!(plan.route, Route::RejectToDlx, "the original, exactly once");
    }
}

fn event(code: Option<ErrorCode>) -> ResultEvent {
    ResultEvent {
        schema: 1,
        event_id: uuid::Uuid::nil(),
        kind: match code {
            Some(_) => EventKind::Failed,
            None => EventKind::Succeeded,
        },
        command_id: Some("6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10".into()),
        customer_id: None,
        product_id: None,
        credit_count: None,
        invoice_id: None,
        new_credit_balance: None,
        attempts: 1,
        occurred_at: time::OffsetDateTime::UNIX_EPOCH,
        reconciled: false,
        error: code.map(|code| EventError {
            code,
            message: "m".into(),
            http_status: None,
        }),
    }
}

#[test]
fn a_refused_event_waits_in_a_delay_queue_with_its_outcome() {
    for case in CASES {
        let h = history(case);
        let plan = decide(Input::EventRefused(event(None)), &h, policy());
        assert_eq!(
            (plan.event.clone(), plan.route),
            (None, Route::Delay(0)),
            "{case:?}"
        );
        assert_eq!(
            plan.history.step, h.step,
            "no step used: not the command's fault"
        );
        assert_eq!(plan.history.setbacks, 1);
        assert!(plan.history.outcome.is_some(), "what was decided is kept");
        // Setbacks walk the delays, then stay on the last one; never a dead letter.
        let mut h = plan.history;
        for expected in [1, 2, 2, 2] {
            let next = decide(Input::EventRefused(event(None)), &h, policy());
            assert_eq!(next.route, Route::Delay(expected));
            h = next.history;
        }
    }
    let none = Policy {
        delays: &[],
        ..policy()
    };
    let plan = decide(
        Input::EventRefused(event(None)),
        &history(Case::First),
        none,
    );
    assert_eq!(plan.route, Route::Return);
    assert_eq!(
        plan.hold,
        Duration::from_secs(1),
        "no delay queue: a wait in process"
    );
}

#[test]
fn a_stored_outcome_is_published_again_and_routed_by_its_code() {
    for case in CASES {
        let h = history(case);
        let ok = decide(Input::Stored(event(None).facts()), &h, policy());
        assert_eq!((ok.route, ok.outcome), (Route::Ack, Outcome::Succeeded));
        let rejected = decide(
            Input::Stored(event(Some(ErrorCode::Rejected)).facts()),
            &h,
            policy(),
        );
        assert_eq!(rejected.route, Route::Ack);
        let dead = decide(
            Input::Stored(event(Some(ErrorCode::UnexpectedResponse)).facts()),
            &h,
            policy(),
        );
        assert_eq!(dead.route, Route::CopyToDlx(ErrorCode::UnexpectedResponse));
    }
}

#[test]
fn a_refused_copy_goes_back_after_a_growing_wait_with_the_published_event() {
    let mut h = history(Case::First);
    let mut holds = Vec::new();
    for _ in 0..7 {
        let input = Input::CopyRefused {
            published: Some(event(None)),
            refused: Outcome::Succeeded,
        };
        let plan = decide(input, &h, policy());
        assert_eq!(plan.route, Route::Return);
        assert!(plan.history.outcome.is_some());
        holds.push(plan.hold.as_secs());
        h = plan.history;
    }
    assert_eq!(holds, [1, 2, 4, 8, 16, 30, 30]);
}

#[test]
fn a_delay_copy_refused_does_not_use_up_its_step() {
    let verdict = Verdict::Exhausted {
        last_status: Some(503),
        last_error: "HTTP 503".into(),
    };
    let h = history(Case::First);
    let deferred = decide(attempted(verdict, 4, Some(503)), &h, policy());
    assert_eq!(deferred.history.step, 1);
    let input = Input::CopyRefused {
        published: None,
        refused: deferred.outcome,
    };
    let back = decide(input, &deferred.history, policy());
    assert_eq!((back.route, back.history.step), (Route::Return, 0));
    assert_eq!(back.history.attempts, 4, "what was learned is kept");
    assert_eq!(back.history.outcome, None);
}

#[test]
fn a_worn_delivery_is_refreshed_then_declared_poison_without_overflow() {
    let mut h = DeliveryHistory {
        deliveries: 10,
        ..history(Case::AfterSteps)
    };
    for refreshes in 1..=MAX_REFRESHES {
        let plan = decide(Input::Worn, &h, policy());
        assert_eq!(
            (plan.route, plan.history.refreshes),
            (Route::Return, refreshes)
        );
        assert_eq!(plan.history.first_attempt_ms, h.first_attempt_ms);
        h = plan.history;
    }
    let hostile = DeliveryHistory {
        deliveries: u64::MAX,
        refreshes: u32::MAX,
        ..h
    };
    let plan = decide(Input::Worn, &hostile, policy());
    assert_eq!(plan.route, Route::CopyToDlx(ErrorCode::RetriesExhausted));
}

mod at_the_window {
    use super::*;
    use crate::hyperline::matching::{Candidate, ChargeLookup};

    pub(super) fn refused_at_window() -> Attempted {
        Attempted {
            verdict: Verdict::WindowClosed {
                first_attempt_ms: NOW - 25 * HOUR,
            },
            requests: 0,
            first_sent_ms: None,
            last_sent_ms: None,
            last_status: None,
        }
    }

    fn past() -> DeliveryHistory {
        DeliveryHistory {
            attempts: 4,
            first_attempt_ms: Some(NOW - 25 * HOUR),
            step: 3,
            ..DeliveryHistory::default()
        }
    }

    #[test]
    fn a_window_closed_plan_says_so_and_no_other_does() {
        let plan = decide(Input::Attempted(refused_at_window()), &past(), policy());
        assert_eq!(plan.closed_window, Some(NOW - 25 * HOUR));
        let ok = decide(
            attempted(
                Verdict::Answered(FinalAnswer::Succeeded(Receipt {
                    invoice_id: "inv_1".into(),
                    new_credit_balance: 1,
                })),
                1,
                Some(201),
            ),
            &past(),
            policy(),
        );
        assert_eq!(ok.closed_window, None);
    }

    #[test]
    fn one_charge_found_is_a_reconciled_success() {
        let found = Candidate {
            transaction_id: "cdt_1".into(),
            invoice_id: "inv_9".into(),
            balance_after: 64,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        let input = Input::Looked {
            attempted: refused_at_window(),
            lookup: ChargeLookup::Charged(found),
        };
        let plan = decide(input, &past(), policy());
        assert_eq!(
            plan.event,
            Some(EventPlan::Reconciled {
                invoice_id: "inv_9".into(),
                new_credit_balance: 64,
                transaction_id: "cdt_1".into(),
            })
        );
        assert_eq!((plan.route, plan.outcome), (Route::Ack, Outcome::Succeeded));
    }

    #[test]
    fn no_charge_found_starts_the_command_again_with_a_fresh_window() {
        let input = Input::Looked {
            attempted: refused_at_window(),
            lookup: ChargeLookup::NotCharged,
        };
        let plan = decide(input, &past(), policy());
        assert_eq!((plan.event.clone(), plan.route), (None, Route::Return));
        assert_eq!(
            plan.history.first_attempt_ms, None,
            "no request may have charged"
        );
        assert_eq!((plan.history.step, plan.history.attempts), (0, 4));
        assert_eq!(plan.hold, Duration::ZERO);

        // A request of this delivery may still be completing: the new window
        // starts with it.
        let mut sent = refused_at_window();
        sent.first_sent_ms = Some(NOW - 1_000);
        sent.requests = 1;
        let plan = decide(
            Input::Looked {
                attempted: sent,
                lookup: ChargeLookup::NotCharged,
            },
            &past(),
            policy(),
        );
        assert_eq!(plan.history.first_attempt_ms, Some(NOW - 1_000));
    }

    #[test]
    fn an_uncertain_lookup_fails_the_command_as_without_it() {
        let input = Input::Looked {
            attempted: refused_at_window(),
            lookup: ChargeLookup::Uncertain {
                reason: "2 matching transactions".into(),
                candidates: Vec::new(),
            },
        };
        let plan = decide(input, &past(), policy());
        assert_eq!(plan.route, Route::CopyToDlx(ErrorCode::RetriesExhausted));
        let Some(EventPlan::Failed { message, .. }) = &plan.event else {
            panic!("a failed event: {plan:?}")
        };
        assert!(message.contains("2 matching transactions"), "{message}");
    }
}

mod worn;
