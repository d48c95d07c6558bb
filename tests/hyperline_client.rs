//! Our Hyperline client against the simulator over real HTTP: every answer
//! classified as the worker must treat it.

use std::time::Duration;

use cpw_testkit::app::start_simulator;
use credit_purchase_worker::configuration::{ApiKey, Settings};
use credit_purchase_worker::contract::Command;
use credit_purchase_worker::hyperline::{
    FinalAnswer, HyperlineClient, ProbeResult, PurchaseAnswer, TransientCause,
};
use credit_purchase_worker::simulator::{Faults, FaultsPatch, Simulator, SimulatorSettings};

const KEY: &str = "sim_test_key";

async fn setup(faults: Faults, key: &str, timeout_secs: u64) -> (Simulator, HyperlineClient) {
    let sim = start_simulator(SimulatorSettings {
        api_key: KEY.into(),
        faults,
        seed: Some(1),
    })
    .await;
    let settings = Settings::load_from(
        None,
        [
            ("CPW__HYPERLINE__BASE_URL".to_string(), sim.base_url()),
            (
                "CPW__HYPERLINE__TIMEOUT_SECS".to_string(),
                timeout_secs.to_string(),
            ),
        ],
    )
    .expect("settings");
    let client = HyperlineClient::new(&settings.hyperline, ApiKey::new(key)).expect("client");
    (sim, client)
}

fn command(id: &str, credits: u64) -> Command {
    let mut body = cpw_testkit::commands::command(id);
    body["credit_count"] = credits.into();
    cpw_testkit::commands::parsed(&body)
}

fn no_limit() -> Faults {
    Faults {
        rate_limit: 0,
        ..Faults::default()
    }
}

#[tokio::test]
async fn success_then_replay_charges_once() {
    let (sim, client) = setup(no_limit(), KEY, 5).await;
    let c = command("client-test-000000000001", 7);
    let PurchaseAnswer::Final(FinalAnswer::Succeeded(first)) =
        client.purchase(&c, None).await.answer
    else {
        panic!("not a success")
    };
    assert_eq!(first.new_credit_balance, 7);
    let PurchaseAnswer::Final(FinalAnswer::Succeeded(again)) =
        client.purchase(&c, None).await.answer
    else {
        panic!("not a success")
    };
    assert_eq!(first, again, "the replay returns the same invoice");
    let ledger = sim.ledger();
    assert_eq!(ledger.charges_for(c.id.as_str()), 1);
    assert_eq!(ledger.replayed, 1);
    let requests = sim.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.idempotency_key.as_deref() == Some(c.id.as_str()))
    );
}

#[tokio::test]
async fn in_progress_is_409_and_mismatch_is_417() {
    let (sim, client) = setup(
        Faults {
            latency_ms: 800,
            ..no_limit()
        },
        KEY,
        5,
    )
    .await;
    let c = command("client-test-000000000002", 1);
    let first = {
        let client = client.clone();
        let c = c.clone();
        tokio::spawn(async move { client.purchase(&c, None).await })
    };
    while sim.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        client.purchase(&c, None).await.answer,
        PurchaseAnswer::InProgress
    );
    assert!(matches!(
        first.await.expect("join").answer,
        PurchaseAnswer::Final(FinalAnswer::Succeeded(_))
    ));
    let other = command("client-test-000000000002", 2);
    assert!(matches!(
        client.purchase(&other, None).await.answer,
        PurchaseAnswer::Final(FinalAnswer::IdempotencyConflict { .. })
    ));
    assert_eq!(sim.ledger().charges.len(), 1);
}

#[tokio::test]
async fn the_write_limit_answers_429_with_its_wait() {
    let (_sim, client) = setup(
        Faults {
            rate_limit: 2,
            ..Faults::default()
        },
        KEY,
        5,
    )
    .await;
    for n in 0..2 {
        let r = client
            .purchase(&command(&format!("client-test-limit-00000{n}"), 1), None)
            .await;
        assert!(matches!(
            r.answer,
            PurchaseAnswer::Final(FinalAnswer::Succeeded(_))
        ));
        assert_eq!(r.quota.map(|q| q.remaining), Some(1 - n));
    }
    let r = client
        .purchase(&command("client-test-limit-000009", 1), None)
        .await;
    let PurchaseAnswer::RateLimited { wait: Some(wait) } = r.answer else {
        panic!("not rate limited: {r:?}")
    };
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(11),
        "{wait:?}"
    );
}

#[tokio::test]
async fn a_wrong_key_is_a_credential_fault_and_the_probe_says_so() {
    let (sim, client) = setup(no_limit(), "wrong_key", 5).await;
    let r = client
        .purchase(&command("client-test-000000000003", 1), None)
        .await;
    assert_eq!(r.answer, PurchaseAnswer::CredentialFault { status: 401 });
    assert_eq!(client.probe_credentials().await, ProbeResult::Refused(401));
    let (_sim2, good) = setup(no_limit(), KEY, 5).await;
    assert_eq!(good.probe_credentials().await, ProbeResult::Accepted);
    assert!(sim.ledger().charges.is_empty(), "probes never charge");
}

#[tokio::test]
async fn a_hang_ends_in_a_timeout_classified_transient() {
    let (sim, client) = setup(
        Faults {
            hang_rate: 1.0,
            ..no_limit()
        },
        KEY,
        1,
    )
    .await;
    let c = command("client-test-000000000004", 1);
    let r = tokio::time::timeout(Duration::from_secs(10), client.purchase(&c, None))
        .await
        .expect("bounded by the client timeout");
    assert_eq!(
        r.answer,
        PurchaseAnswer::Transient {
            status: None,
            cause: TransientCause::Timeout
        }
    );
    sim.set_faults(FaultsPatch {
        hang_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    assert!(matches!(
        client.purchase(&c, None).await.answer,
        PurchaseAnswer::Final(FinalAnswer::Succeeded(_))
    ));
    assert_eq!(sim.ledger().charges_for(c.id.as_str()), 1);
}

#[tokio::test]
async fn a_dropped_connection_is_transient() {
    let (_sim, client) = setup(
        Faults {
            drop_rate: 1.0,
            ..no_limit()
        },
        KEY,
        5,
    )
    .await;
    let r = client
        .purchase(&command("client-test-000000000005", 1), None)
        .await;
    assert!(
        matches!(r.answer, PurchaseAnswer::Transient { status: None, .. }),
        "{r:?}"
    );
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error() {
    let settings = Settings::load_from(
        None,
        [(
            "CPW__HYPERLINE__BASE_URL".to_string(),
            "http://127.0.0.1:9".to_string(),
        )],
    )
    .expect("settings");
    let client = HyperlineClient::new(&settings.hyperline, ApiKey::new(KEY)).expect("client");
    let r = client
        .purchase(&command("client-test-000000000006", 1), None)
        .await;
    assert_eq!(
        r.answer,
        PurchaseAnswer::Transient {
            status: None,
            cause: TransientCause::Connect
        }
    );
}

#[tokio::test]
async fn the_key_never_shows_in_debug_output() {
    let (_sim, client) = setup(no_limit(), "sk_live_do_not_print", 5).await;
    assert!(!format!("{client:?}").contains("sk_live_do_not_print"));
}

mod transactions {
    use super::*;
    use credit_purchase_worker::hyperline::gate::Gate;
    use credit_purchase_worker::hyperline::{ReadBounds, TransactionsError};

    fn bounds(max_pages: u32) -> ReadBounds {
        ReadBounds {
            attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_pages,
        }
    }

    fn gate() -> Gate {
        Gate::new(0, Duration::from_secs(5), Duration::from_secs(300))
    }

    /// Buys `n` purchases of one credit for the customer of `c`.
    async fn buy(client: &HyperlineClient, n: usize) -> Command {
        let mut last = None;
        for i in 0..n {
            let c = command(&format!("client-tx-{i:016}"), 1);
            let answer = client.purchase(&c, None).await.answer;
            assert!(
                matches!(answer, PurchaseAnswer::Final(FinalAnswer::Succeeded(_))),
                "{answer:?}"
            );
            last = Some(c);
        }
        last.expect("at least one purchase")
    }

    #[tokio::test]
    async fn pages_through_every_transaction_in_order() {
        let (sim, client) = setup(no_limit(), KEY, 5).await;
        let c = buy(&client, 150).await;
        let listing = tokio::time::timeout(
            Duration::from_secs(10),
            client.transactions(&c.customer_id, &c.product_id, &gate(), bounds(5)),
        )
        .await
        .expect("bounded")
        .expect("a listing");
        let ids: Vec<String> = listing.iter().map(|t| t.id.clone()).collect();
        let expected: Vec<String> = sim.transactions().into_iter().map(|t| t.id).collect();
        assert_eq!(ids, expected, "both pages, in order");
        assert_eq!(sim.ledger().reads, 2, "two pages of 100");
        assert_eq!(listing[149].balance_after, Some(150));

        let capped = client
            .transactions(&c.customer_id, &c.product_id, &gate(), bounds(1))
            .await;
        assert_eq!(
            capped,
            Err(TransactionsError::TooMany {
                pages: 1,
                total: 150
            }),
            "bounded by the cap on pages"
        );
    }

    #[tokio::test]
    async fn a_429_is_waited_out_as_retry_after_says() {
        let faults = Faults {
            read_rate_limit: 1,
            rate_limit_window_ms: 1_000,
            ..no_limit()
        };
        let (sim, client) = setup(faults, KEY, 5).await;
        let c = buy(&client, 1).await;
        // Another client spends the read budget of the window.
        let url = format!(
            "{}/v1/customers/{}/credits/{}/transactions",
            sim.base_url(),
            c.customer_id.as_str(),
            c.product_id.as_str()
        );
        let spent = reqwest::Client::new()
            .get(url)
            .bearer_auth(KEY)
            .send()
            .await
            .expect("an answer");
        assert_eq!(spent.status(), 200);
        let started = std::time::Instant::now();
        let listing = client
            .transactions(&c.customer_id, &c.product_id, &gate(), bounds(5))
            .await
            .expect("a listing once the window reset");
        assert_eq!(listing.len(), 1);
        assert_eq!(sim.ledger().rate_limited, 1, "refused once, then waited");
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "retried after {:?}, before the window reset",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_refused_key_is_final_and_never_shown() {
        let (sim, client) = setup(no_limit(), "a_wrong_key_0123456789", 5).await;
        let c = command("client-tx-0000000000000001", 1);
        let refused = client
            .transactions(&c.customer_id, &c.product_id, &gate(), bounds(5))
            .await;
        let Err(e @ TransactionsError::Refused { status: 401, .. }) = refused else {
            panic!("refused: {refused:?}")
        };
        assert!(!e.to_string().contains("a_wrong_key"), "{e}");
        assert_eq!(sim.ledger().reads, 1, "a 401 is not retried");
    }

    #[tokio::test]
    async fn server_errors_are_retried_then_reported() {
        // Nothing listens: every try is a connection error.
        let (sim, client) = setup(no_limit(), KEY, 1).await;
        sim.shutdown().await;
        let c = command("client-tx-0000000000000001", 1);
        let failed = client
            .transactions(&c.customer_id, &c.product_id, &gate(), bounds(5))
            .await;
        assert!(
            matches!(
                failed,
                Err(TransactionsError::Exhausted { attempts: 3, .. })
            ),
            "{failed:?}"
        );
    }
}
