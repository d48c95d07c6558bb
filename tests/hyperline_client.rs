//! Our Hyperline client against the simulator over real HTTP: every answer
//! classified as the worker must treat it.

use std::time::Duration;

use credit_purchase_worker::configuration::{ApiKey, Settings};
use credit_purchase_worker::contract::Command;
use credit_purchase_worker::hyperline::{
    HyperlineClient, ProbeResult, PurchaseAnswer, TransientCause,
};
use credit_purchase_worker::simulator::{Faults, FaultsPatch, Simulator, SimulatorSettings};

const KEY: &str = "sim_test_key";

async fn setup(faults: Faults, key: &str, timeout_secs: u64) -> (Simulator, HyperlineClient) {
    let sim = Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        SimulatorSettings {
            api_key: KEY.into(),
            faults,
            seed: Some(1),
        },
    )
    .await
    .expect("simulator");
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
    let PurchaseAnswer::Succeeded(first) = client.purchase(&c, None).await.answer else {
        panic!("not a success")
    };
    assert_eq!(first.new_credit_balance, 7);
    let PurchaseAnswer::Succeeded(again) = client.purchase(&c, None).await.answer else {
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
        PurchaseAnswer::Succeeded(_)
    ));
    let other = command("client-test-000000000002", 2);
    assert!(matches!(
        client.purchase(&other, None).await.answer,
        PurchaseAnswer::IdempotencyConflict { .. }
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
        assert!(matches!(r.answer, PurchaseAnswer::Succeeded(_)));
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
        PurchaseAnswer::Succeeded(_)
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
