//! The Hyperline simulator seen from outside: a plain HTTP client against an
//! in-process simulator, checking each behaviour the worker relies on
//! (answer shapes, idempotency, rate limit, auth, validation, faults) and the
//! ledger that proves how many times something was charged.

use cpw_testkit::app::start_simulator;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use credit_purchase_worker::simulator::{
    Faults, FaultsPatch, ScriptedResponse, Simulator, SimulatorSettings,
};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const API_KEY: &str = "sim_test_key";
const KEY_A: &str = "cmd-0000000000000001";
const KEY_B: &str = "cmd-0000000000000002";
/// Upper bound for anything a test waits on.
const BOUND: Duration = Duration::from_secs(10);

async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .expect("the wait is bounded")
}

async fn start(faults: Faults) -> Simulator {
    let settings = SimulatorSettings {
        faults,
        seed: Some(7),
        ..SimulatorSettings::default()
    };
    start_simulator(settings).await
}

fn client() -> Client {
    Client::builder().build().expect("client")
}

fn purchase_url(sim: &Simulator, customer: &str, product: &str) -> String {
    format!(
        "{}/v1/customers/{customer}/credits/{product}/purchase",
        sim.base_url()
    )
}

/// A purchase with the right key; `key` becomes the `Idempotency-Key`.
async fn buy(
    client: &Client,
    sim: &Simulator,
    (customer, product): (&str, &str),
    key: Option<&str>,
    body: Value,
) -> reqwest::Result<Response> {
    let mut request = client
        .post(purchase_url(sim, customer, product))
        .bearer_auth(API_KEY)
        .json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    bounded(request.send()).await
}

async fn body_of(response: Response) -> Value {
    bounded(response.json()).await.expect("a JSON body")
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

fn amount(credit_count: u64) -> Value {
    json!({ "credit_count": credit_count, "amount_excluding_tax": 750 * credit_count })
}

#[tokio::test]
async fn success_has_the_documented_shape_and_balances_accumulate_per_customer_and_product() {
    let sim = start(Faults::default()).await;
    let http = client();

    let first = bounded(
        http.post(purchase_url(&sim, "cus_a", "prod_x"))
            .bearer_auth(API_KEY)
            .header("Idempotency-Key", KEY_A)
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .json(&json!({ "credit_count": 32, "amount_excluding_tax": 24000,
                           "expires_at": "2027-01-01T00:00:00Z" }))
            .send(),
    )
    .await
    .expect("an answer");
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(header(&first, "content-type"), Some("application/json"));
    assert_eq!(header(&first, "x-ratelimit-limit"), Some("50"));
    assert_eq!(header(&first, "x-ratelimit-remaining"), Some("49"));
    let first = body_of(first).await;
    let invoice = first["invoice_id"]
        .as_str()
        .expect("invoice_id is a string");
    assert!(
        invoice.starts_with("inv_") && invoice.len() == 4 + 32,
        "{invoice}"
    );
    assert_eq!(first["new_credit_balance"], 32);

    let cases = [
        (("cus_a", "prod_x"), Some(KEY_B), amount(10), 42),
        (("cus_b", "prod_x"), None, amount(5), 5),
        (
            ("cus_a", "prod_y"),
            None,
            json!({ "credit_count": 3, "price_id": "price_pack3" }),
            3,
        ),
        (("cus_a", "prod_x"), None, amount(1), 43),
    ];
    for (target, key, body, balance) in cases {
        let response = buy(&http, &sim, target, key, body)
            .await
            .expect("an answer");
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(body_of(response).await["new_credit_balance"], balance);
    }

    let ledger = sim.ledger();
    assert_eq!(ledger.charges.len(), 5);
    assert_eq!(ledger.requests, 5);
    assert_eq!(ledger.charges[0].invoice_id, invoice);
    assert_eq!(ledger.charges[0].amount_excluding_tax, Some(24000));
    assert_eq!(ledger.charges[3].price_id.as_deref(), Some("price_pack3"));
    let record = &sim.requests()[0];
    assert_eq!(record.method, "POST");
    assert_eq!(record.path, "/v1/customers/cus_a/credits/prod_x/purchase");
    assert_eq!(record.idempotency_key.as_deref(), Some(KEY_A));
    assert!(record.authorization_ok);
    assert_eq!(
        record.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(record.status, Some(201));
}

#[tokio::test]
async fn a_repeated_key_replays_the_same_answer_and_charges_once() {
    let sim = start(Faults::default()).await;
    let http = client();
    let target = ("cus_a", "prod_x");

    let first = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert_eq!(first.status(), StatusCode::CREATED);
    let first = bounded(first.bytes()).await.expect("body");
    let again = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(bounded(again.bytes()).await.expect("body"), first);

    let next = buy(&http, &sim, target, Some(KEY_B), amount(1))
        .await
        .expect("answer");
    assert_eq!(body_of(next).await["new_credit_balance"], 33);
    let ledger = sim.ledger();
    assert_eq!(ledger.charges_for(KEY_A), 1);
    assert_eq!(ledger.replayed, 1);
    assert_eq!(ledger.charges.len(), 2);
}

/// Hyperline replays a success for 24 hours and then forgets the key; a
/// short `replay_ttl_secs` lets a test see what comes after: the same key
/// and request are charged anew.
#[tokio::test]
async fn a_key_is_replayed_within_the_replay_ttl_and_charged_anew_after_it() {
    let sim = start(Faults::default()).await;
    let http = client();
    let target = ("cus_a", "prod_x");
    let changed = bounded(
        http.post(format!("{}/_sim/faults", sim.base_url()))
            .json(&json!({ "replay_ttl_secs": 1 }))
            .send(),
    )
    .await
    .expect("answer");
    assert_eq!(changed.status(), StatusCode::OK);
    assert_eq!(body_of(changed).await["replay_ttl_secs"], 1);

    let first = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert_eq!(first.status(), StatusCode::CREATED);
    let first = body_of(first).await;
    let replayed = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert_eq!(body_of(replayed).await, first, "replayed within the TTL");
    assert_eq!(sim.ledger().charges_for(KEY_A), 1);

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let again = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert_eq!(again.status(), StatusCode::CREATED);
    let again = body_of(again).await;
    assert_ne!(again["invoice_id"], first["invoice_id"], "a new invoice");
    assert_eq!(again["new_credit_balance"], 64, "charged a second time");
    let ledger = sim.ledger();
    assert_eq!(ledger.charges_for(KEY_A), 2);
    assert_eq!(ledger.replayed, 1);
}

#[tokio::test]
async fn the_same_key_in_progress_gets_409() {
    let sim = start(Faults {
        latency_ms: 1500,
        ..Faults::default()
    })
    .await;
    let http = client();
    let target = ("cus_a", "prod_x");

    let (one, two) = tokio::join!(
        buy(&http, &sim, target, Some(KEY_A), amount(32)),
        buy(&http, &sim, target, Some(KEY_A), amount(32)),
    );
    let (one, two) = (one.expect("answer"), two.expect("answer"));
    let mut statuses = [one.status().as_u16(), two.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409]);
    let conflict = if one.status() == StatusCode::CONFLICT {
        one
    } else {
        two
    };
    assert!(body_of(conflict).await["message"].as_str().is_some());

    let ledger = sim.ledger();
    assert_eq!(ledger.conflicts, 1);
    assert_eq!(ledger.charges_for(KEY_A), 1);
}

#[tokio::test]
async fn a_purchase_completes_even_when_its_client_gives_up() {
    // Real servers do not cancel a purchase because the client timed out:
    // the charge happens, and only the Idempotency-Key makes the retry safe.
    let sim = start(Faults {
        latency_ms: 600,
        ..Faults::default()
    })
    .await;
    let impatient = Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let target = ("cus_a", "prod_x");

    let error = buy(&impatient, &sim, target, Some(KEY_A), amount(1))
        .await
        .expect_err("the client gives up first");
    assert!(error.is_timeout(), "{error}");

    // While the abandoned request still runs, the key is in progress.
    let http = client();
    let retry = buy(&http, &sim, target, Some(KEY_A), amount(1))
        .await
        .expect("answer");
    assert_eq!(retry.status(), StatusCode::CONFLICT);

    // Once it has finished, the retry replays its charge.
    let deadline = std::time::Instant::now() + BOUND;
    let response = loop {
        let response = buy(&http, &sim, target, Some(KEY_A), amount(1))
            .await
            .expect("answer");
        if response.status() != StatusCode::CONFLICT || std::time::Instant::now() >= deadline {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(response.status(), StatusCode::CREATED);
    let ledger = sim.ledger();
    assert_eq!(ledger.charges_for(KEY_A), 1);
    assert_eq!(ledger.replayed, 1);
}

#[tokio::test]
async fn a_key_reused_for_another_request_gets_417() {
    let sim = start(Faults::default()).await;
    let http = client();

    let first = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_A), amount(32)).await;
    assert_eq!(first.expect("answer").status(), StatusCode::CREATED);
    for (target, body) in [
        (("cus_a", "prod_x"), amount(33)),
        (("cus_b", "prod_x"), amount(32)),
    ] {
        let response = buy(&http, &sim, target, Some(KEY_A), body)
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::EXPECTATION_FAILED);
        assert!(body_of(response).await["message"].as_str().is_some());
    }
    assert_eq!(sim.ledger().charges.len(), 1);
}

#[tokio::test]
async fn over_the_rate_limit_gets_429_with_retry_after_and_rate_limit_headers() {
    let sim = start(Faults {
        rate_limit: 2,
        rate_limit_window_ms: 60_000,
        ..Faults::default()
    })
    .await;
    let http = client();
    let target = ("cus_a", "prod_x");

    for remaining in ["1", "0"] {
        let response = buy(&http, &sim, target, None, amount(1))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(header(&response, "x-ratelimit-remaining"), Some(remaining));
    }
    for _ in 0..2 {
        let response = buy(&http, &sim, target, None, amount(1))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&response, "x-ratelimit-limit"), Some("2"));
        assert_eq!(header(&response, "x-ratelimit-remaining"), Some("0"));
        let retry_after: u64 = header(&response, "retry-after")
            .and_then(|value| value.parse().ok())
            .expect("Retry-After in seconds");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        let reset = header(&response, "x-ratelimit-reset").expect("X-RateLimit-Reset");
        let reset = OffsetDateTime::parse(reset, &Rfc3339).expect("an RFC 3339 date-time");
        let until = reset - OffsetDateTime::now_utc();
        assert!(until > time::Duration::ZERO && until <= time::Duration::seconds(60));
        assert!(body_of(response).await["message"].as_str().is_some());
    }
    let ledger = sim.ledger();
    assert_eq!(ledger.rate_limited, 2);
    assert_eq!(ledger.charges.len(), 2);
}

#[tokio::test]
async fn the_rate_limit_window_resets() {
    let sim = start(Faults {
        rate_limit: 1,
        rate_limit_window_ms: 300,
        ..Faults::default()
    })
    .await;
    let http = client();
    let target = ("cus_a", "prod_x");

    let first = buy(&http, &sim, target, None, amount(1))
        .await
        .expect("answer");
    assert_eq!(first.status(), StatusCode::CREATED);
    let refused = buy(&http, &sim, target, None, amount(1))
        .await
        .expect("answer");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "retry-after"), Some("1"));
    // Waiting out the window is the behaviour under test, not synchronisation.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let after = buy(&http, &sim, target, None, amount(1))
        .await
        .expect("answer");
    assert_eq!(after.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_wrong_or_missing_key_and_the_reject_switch_get_401() {
    let sim = start(Faults::default()).await;
    let http = client();
    let url = purchase_url(&sim, "cus_a", "prod_x");

    let wrong = bounded(http.post(&url).bearer_auth("nope").json(&amount(1)).send()).await;
    let wrong = wrong.expect("answer");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&wrong, "x-ratelimit-limit"), None);
    assert!(body_of(wrong).await["message"].as_str().is_some());
    let missing = bounded(http.post(&url).json(&amount(1)).send()).await;
    assert_eq!(missing.expect("answer").status(), StatusCode::UNAUTHORIZED);

    sim.set_faults(FaultsPatch {
        reject_auth: Some(true),
        ..FaultsPatch::default()
    });
    let rejected = buy(&http, &sim, ("cus_a", "prod_x"), None, amount(1)).await;
    assert_eq!(rejected.expect("answer").status(), StatusCode::UNAUTHORIZED);

    let auth: Vec<bool> = sim.requests().iter().map(|r| r.authorization_ok).collect();
    assert_eq!(auth, [false, false, true]);
    assert_eq!(sim.ledger().requests, 3);
    assert!(sim.ledger().charges.is_empty());
}

#[tokio::test]
async fn invalid_requests_get_400_or_404_with_a_precise_message_and_leave_the_key_free() {
    let sim = start(Faults::default()).await;
    let http = client();
    let target = ("cus_a", "prod_x");

    let bodies = [
        (
            json!({ "amount_excluding_tax": 100 }),
            "credit_count is required",
        ),
        (
            json!({ "credit_count": 0, "amount_excluding_tax": 100 }),
            "credit_count must be",
        ),
        (
            json!({ "credit_count": 1.5, "amount_excluding_tax": 100 }),
            "credit_count must be",
        ),
        (
            json!({ "credit_count": 1 }),
            "either amount_excluding_tax or price_id",
        ),
        (
            json!({ "credit_count": 1, "amount_excluding_tax": 1, "price_id": "p" }),
            "not both",
        ),
        (
            json!({ "credit_count": 1, "amount_excluding_tax": -1 }),
            "amount_excluding_tax must be",
        ),
        (
            json!({ "credit_count": 1, "price_id": "" }),
            "price_id must be",
        ),
        (
            json!({ "credit_count": 1, "price_id": "p", "expires_at": "soon" }),
            "expires_at",
        ),
        (json!([1, 2]), "JSON object"),
    ];
    for (body, expected) in bodies {
        let response = buy(&http, &sim, target, Some(KEY_A), body.clone())
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let message = body_of(response).await["message"]
            .as_str()
            .map(str::to_owned);
        assert!(
            message.as_deref().is_some_and(|m| m.contains(expected)),
            "{message:?}"
        );
    }
    let not_json = bounded(
        http.post(purchase_url(&sim, "cus_a", "prod_x"))
            .bearer_auth(API_KEY)
            .body("{credit_count")
            .send(),
    )
    .await
    .expect("answer");
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    assert!(
        body_of(not_json).await["message"]
            .as_str()
            .is_some_and(|m| m.contains("JSON"))
    );

    let short = buy(&http, &sim, target, Some("too-short"), amount(1))
        .await
        .expect("answer");
    assert_eq!(short.status(), StatusCode::BAD_REQUEST);
    assert!(
        body_of(short).await["message"]
            .as_str()
            .is_some_and(|m| m.contains("16"))
    );

    for (target, message) in [
        (("bad.customer", "prod_x"), "customer not found"),
        (("cus_a", "bad%20product"), "product not found"),
    ] {
        let response = buy(&http, &sim, target, Some(KEY_A), amount(1))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_of(response).await["message"], message);
    }

    assert!(sim.ledger().charges.is_empty());
    let valid = buy(&http, &sim, target, Some(KEY_A), amount(1))
        .await
        .expect("answer");
    assert_eq!(valid.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn injected_failures_are_not_cached_and_the_key_succeeds_later() {
    let sim = start(Faults {
        fail_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let http = client();
    let target = ("cus_a", "prod_x");

    let failed = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert!(
        [500, 502, 503].contains(&failed.status().as_u16()),
        "{}",
        failed.status()
    );
    assert!(body_of(failed).await["message"].as_str().is_some());
    assert_eq!(sim.ledger().faults, 1);
    assert!(sim.ledger().charges.is_empty());

    sim.set_faults(FaultsPatch {
        fail_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    let retried = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert_eq!(retried.status(), StatusCode::CREATED);
    let ledger = sim.ledger();
    assert_eq!(ledger.charges_for(KEY_A), 1);
    assert_eq!(ledger.replayed, 0);
}

#[tokio::test]
async fn a_hang_charges_then_times_the_client_out_and_a_retry_replays_the_charge() {
    let sim = start(Faults {
        hang_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let impatient = Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let target = ("cus_a", "prod_x");

    let error = buy(&impatient, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect_err("no answer comes");
    assert!(error.is_timeout(), "{error}");
    let ledger = sim.ledger();
    assert_eq!(ledger.charges_for(KEY_A), 1);
    assert_eq!(ledger.faults, 1);
    assert_eq!(sim.requests()[0].status, None);

    sim.set_faults(FaultsPatch {
        hang_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    let retried = buy(&impatient, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert_eq!(retried.status(), StatusCode::CREATED);
    assert_eq!(
        body_of(retried).await["invoice_id"],
        ledger.charges[0].invoice_id
    );
    let ledger = sim.ledger();
    assert_eq!(ledger.charges_for(KEY_A), 1);
    assert_eq!(ledger.replayed, 1);
}

#[tokio::test]
async fn a_drop_charges_then_closes_the_connection_without_an_answer() {
    let sim = start(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let http = client();
    let target = ("cus_a", "prod_x");

    let error = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect_err("the connection is closed");
    assert!(error.is_request() && !error.is_timeout(), "{error:?}");
    assert!(error.status().is_none());
    assert_eq!(sim.ledger().charges_for(KEY_A), 1);
    assert_eq!(sim.ledger().faults, 1);

    sim.set_faults(FaultsPatch {
        drop_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    let retried = buy(&http, &sim, target, Some(KEY_A), amount(32))
        .await
        .expect("answer");
    assert_eq!(retried.status(), StatusCode::CREATED);
    assert_eq!(sim.ledger().charges_for(KEY_A), 1);
}

#[tokio::test]
async fn scripted_responses_answer_matching_requests_without_charging() {
    let script = |customer: Option<&str>, status, body, times| ScriptedResponse {
        customer_id: customer.map(str::to_owned),
        status,
        body,
        headers: BTreeMap::new(),
        times,
    };
    let mut forbidden = script(None, 403, json!({ "message": "forbidden" }), Some(1));
    forbidden
        .headers
        .insert("x-sim".to_owned(), "yes".to_owned());
    let sim = start(Faults {
        scripted: vec![
            script(
                Some("cus_422"),
                422,
                json!({ "message": "unprocessable" }),
                Some(1),
            ),
            script(
                Some("cus_html"),
                502,
                json!("<html>bad gateway</html>"),
                None,
            ),
            script(Some("cus_odd"), 201, json!({ "invoice": 1 }), Some(1)),
            forbidden,
        ],
        ..Faults::default()
    })
    .await;
    let http = client();
    let send = |customer| buy(&http, &sim, (customer, "prod_x"), None, amount(1));

    let unprocessable = send("cus_422").await.expect("answer");
    assert_eq!(unprocessable.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(header(&unprocessable, "x-ratelimit-limit"), Some("50"));
    assert_eq!(body_of(unprocessable).await["message"], "unprocessable");
    let forbidden = send("cus_a").await.expect("answer");
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&forbidden, "x-sim"), Some("yes"));
    for _ in 0..2 {
        let html = send("cus_html").await.expect("answer");
        assert_eq!(html.status(), StatusCode::BAD_GATEWAY);
        let text = bounded(html.text()).await.expect("body");
        assert_eq!(text, "<html>bad gateway</html>");
    }
    let odd = send("cus_odd").await.expect("answer");
    assert_eq!(odd.status(), StatusCode::CREATED);
    assert_eq!(body_of(odd).await, json!({ "invoice": 1 }));
    assert!(sim.ledger().charges.is_empty());

    let processed = send("cus_422").await.expect("answer");
    assert_eq!(processed.status(), StatusCode::CREATED);
    assert_eq!(sim.ledger().charges.len(), 1);
    assert_eq!(
        sim.faults().scripted.len(),
        1,
        "used-up scripts are removed"
    );
}

#[tokio::test]
async fn the_control_plane_reads_the_ledger_and_changes_faults() {
    let sim = start(Faults::default()).await;
    let http = client();
    let control = |path: &str| format!("{}/_sim/{path}", sim.base_url());

    let health = bounded(http.get(format!("{}/healthz", sim.base_url())).send()).await;
    assert_eq!(health.expect("answer").status(), StatusCode::OK);
    let faults: Faults = bounded(
        bounded(http.get(control("faults")).send())
            .await
            .expect("answer")
            .json(),
    )
    .await
    .expect("faults");
    assert_eq!(faults, Faults::default());

    let changed = bounded(
        http.post(control("faults"))
            .json(&json!({ "fail_rate": 1.0, "latency_ms": 5 }))
            .send(),
    )
    .await
    .expect("answer");
    assert_eq!(changed.status(), StatusCode::OK);
    let changed: Faults = bounded(changed.json()).await.expect("faults");
    let expected = Faults {
        fail_rate: 1.0,
        latency_ms: 5,
        ..Faults::default()
    };
    assert_eq!(changed, expected);
    assert_eq!(sim.faults(), expected);

    for bad in [
        json!({ "hang_rate": 1.5 }),
        json!({ "drop_rate": -0.1 }),
        json!("nonsense"),
    ] {
        let refused = bounded(http.post(control("faults")).json(&bad).send())
            .await
            .expect("answer");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert!(body_of(refused).await["message"].as_str().is_some());
    }
    assert_eq!(sim.faults(), expected);

    let failed = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_A), amount(1))
        .await
        .expect("answer");
    assert!(failed.status().is_server_error());
    let ledger: Value = body_of(
        bounded(http.get(control("ledger")).send())
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(ledger["requests"], 1);
    assert_eq!(ledger["faults"], 1);
    assert_eq!(ledger["charges"], json!([]));
    for counter in ["replayed", "conflicts", "rate_limited"] {
        assert_eq!(ledger[counter], 0, "{counter}");
    }
    let requests: Value = body_of(
        bounded(http.get(control("requests")).send())
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(requests[0]["idempotency_key"], KEY_A);
    assert_eq!(requests[0]["status"], failed.status().as_u16());
}

#[tokio::test]
async fn a_seeded_simulator_rolls_the_same_faults_and_invoice_ids() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let sim = start(Faults {
            fail_rate: 0.5,
            ..Faults::default()
        })
        .await;
        let http = client();
        let mut answers = Vec::new();
        for _ in 0..12 {
            let response = buy(&http, &sim, ("cus_a", "prod_x"), None, amount(1)).await;
            let response = response.expect("answer");
            answers.push((
                response.status().as_u16(),
                bounded(response.text()).await.expect("body"),
            ));
        }
        runs.push(answers);
    }
    assert_eq!(runs[0], runs[1]);
    let statuses: Vec<u16> = runs[0].iter().map(|(status, _)| *status).collect();
    assert!(
        statuses.contains(&201) && statuses.iter().any(|s| *s >= 500),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn shutdown_ends_hung_connections_and_stops_listening() {
    let sim = start(Faults {
        hang_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let http = client();
    let url = purchase_url(&sim, "cus_a", "prod_x");
    let addr = sim.addr();

    let mut hung = Box::pin(http.post(&url).bearer_auth(API_KEY).json(&amount(1)).send());
    let still_waiting = tokio::time::timeout(Duration::from_millis(300), &mut hung).await;
    assert!(still_waiting.is_err(), "a hung request gets no answer");

    bounded(sim.shutdown()).await;
    let ended = bounded(hung).await;
    assert!(ended.is_err_and(|error| error.status().is_none()));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

fn transactions_url(sim: &Simulator, customer: &str, product: &str, query: &str) -> String {
    format!(
        "{}/v1/customers/{customer}/credits/{product}/transactions{query}",
        sim.base_url()
    )
}

async fn list(http: &Client, url: &str, key: Option<&str>) -> Response {
    let mut request = http.get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    bounded(request.send()).await.expect("an answer")
}

#[tokio::test]
async fn every_charge_is_a_credit_transaction_listed_in_order_with_take_and_skip() {
    let sim = start(Faults::default()).await;
    let http = client();
    let by_amount = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_A), amount(32)).await;
    let receipt = body_of(by_amount.expect("answer")).await;
    let by_price = json!({ "credit_count": 3, "price_id": "price_pack3" });
    let priced = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_B), by_price).await;
    assert_eq!(priced.expect("answer").status(), StatusCode::CREATED);
    let elsewhere = buy(&http, &sim, ("cus_b", "prod_x"), None, amount(1)).await;
    assert_eq!(elsewhere.expect("answer").status(), StatusCode::CREATED);
    // A replay is no new transaction.
    let replay = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_A), amount(32)).await;
    assert_eq!(replay.expect("answer").status(), StatusCode::CREATED);

    let all = list(
        &http,
        &transactions_url(&sim, "cus_a", "prod_x", ""),
        Some(API_KEY),
    )
    .await;
    assert_eq!(all.status(), StatusCode::OK);
    assert_eq!(header(&all, "x-ratelimit-limit"), Some("200"));
    assert_eq!(header(&all, "x-ratelimit-remaining"), Some("199"));
    let all = body_of(all).await;
    assert_eq!(all["meta"], json!({"total": 2, "taken": 2, "skipped": 0}));
    let first = &all["data"][0];
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cdt_")),
        "{first}"
    );
    assert_eq!(first["customer_id"], "cus_a");
    assert_eq!(first["product_id"], "prod_x");
    assert_eq!(first["invoice_id"], receipt["invoice_id"]);
    assert_eq!(first["credit_count"], 32);
    assert_eq!(first["amount_excluding_tax"], 24_000);
    assert_eq!(first["price"], Value::Null);
    assert_eq!(
        (&first["type"], &first["source"]),
        (&json!("topup"), &json!("api"))
    );
    assert_eq!(first["balance_after"], receipt["new_credit_balance"]);
    let second = &all["data"][1];
    assert_eq!(second["price"]["id"], "price_pack3");
    assert_eq!(second["amount_excluding_tax"], Value::Null);
    assert_eq!(second["balance_after"], 35);
    let at = |t: &Value| {
        OffsetDateTime::parse(t["created_at"].as_str().expect("created_at"), &Rfc3339)
            .expect("RFC 3339")
    };
    assert!(at(first) <= at(second), "in order of created_at");

    let page = list(
        &http,
        &transactions_url(&sim, "cus_a", "prod_x", "?take=1&skip=1"),
        Some(API_KEY),
    )
    .await;
    let page = body_of(page).await;
    assert_eq!(page["meta"], json!({"total": 2, "taken": 1, "skipped": 1}));
    assert_eq!(page["data"][0]["id"], second["id"]);
    let beyond = list(
        &http,
        &transactions_url(&sim, "cus_a", "prod_x", "?take=100&skip=5"),
        Some(API_KEY),
    )
    .await;
    assert_eq!(
        body_of(beyond).await,
        json!({"meta": {"total": 2, "taken": 0, "skipped": 5}, "data": []})
    );
    let nobody = list(
        &http,
        &transactions_url(&sim, "cus_none", "prod_x", ""),
        Some(API_KEY),
    )
    .await;
    assert_eq!(body_of(nobody).await["meta"]["total"], 0);
    assert_eq!(sim.transactions().len(), 3);
}

#[tokio::test]
async fn transactions_refuse_like_purchases_a_bad_key_an_impossible_id_and_a_bad_page() {
    let sim = start(Faults::default()).await;
    let http = client();
    let url = transactions_url(&sim, "cus_a", "prod_x", "");
    assert_eq!(
        list(&http, &url, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        list(&http, &url, Some("wrong")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let impossible = transactions_url(&sim, "cus.a", "prod_x", "");
    let refused = list(&http, &impossible, Some(API_KEY)).await;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    assert_eq!(body_of(refused).await["message"], "customer not found");
    for query in ["?take=101", "?take=-1", "?skip=x"] {
        let url = transactions_url(&sim, "cus_a", "prod_x", query);
        let refused = list(&http, &url, Some(API_KEY)).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{query}");
        assert!(body_of(refused).await["message"].is_string());
    }
    sim.set_faults(FaultsPatch {
        reject_auth: Some(true),
        ..FaultsPatch::default()
    });
    assert_eq!(
        list(&http, &url, Some(API_KEY)).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn reads_have_their_own_limit_apart_from_writes() {
    let sim = start(Faults {
        rate_limit: 1,
        read_rate_limit: 2,
        ..Faults::default()
    })
    .await;
    let http = client();
    let bought = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_A), amount(1)).await;
    assert_eq!(bought.expect("answer").status(), StatusCode::CREATED);
    let throttled = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_B), amount(1)).await;
    assert_eq!(
        throttled.expect("answer").status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the write budget is spent"
    );
    let url = transactions_url(&sim, "cus_a", "prod_x", "");
    for remaining in ["1", "0"] {
        let read = list(&http, &url, Some(API_KEY)).await;
        assert_eq!(read.status(), StatusCode::OK, "reads have their own budget");
        assert_eq!(header(&read, "x-ratelimit-remaining"), Some(remaining));
    }
    let refused = list(&http, &url, Some(API_KEY)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(header(&refused, "retry-after").is_some());
    assert_eq!(header(&refused, "x-ratelimit-limit"), Some("2"));
    let ledger = sim.ledger();
    assert_eq!((ledger.reads, ledger.rate_limited), (3, 2));
}

#[tokio::test]
async fn an_after_charge_script_charges_then_answers_the_scripted_body() {
    let garbled = ScriptedResponse {
        customer_id: Some("cus_a".into()),
        status: 201,
        body: json!({"status": "ok"}),
        headers: BTreeMap::new(),
        times: Some(1),
    };
    let sim = start(Faults {
        after_charge: vec![garbled],
        ..Faults::default()
    })
    .await;
    let http = client();
    let answer = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_A), amount(2)).await;
    let answer = answer.expect("answer");
    assert_eq!(answer.status(), StatusCode::CREATED);
    assert_eq!(body_of(answer).await, json!({"status": "ok"}));
    let ledger = sim.ledger();
    assert_eq!(
        ledger.charges_for(KEY_A),
        1,
        "charged before the garbled answer"
    );
    assert_eq!(
        sim.transactions()[0].invoice_id,
        ledger.charges[0].invoice_id
    );
    // The real answer was cached: the same key replays it, uncharged.
    let replay = buy(&http, &sim, ("cus_a", "prod_x"), Some(KEY_A), amount(2)).await;
    let replay = body_of(replay.expect("answer")).await;
    assert_eq!(replay["invoice_id"], json!(ledger.charges[0].invoice_id));
    assert_eq!(sim.ledger().charges_for(KEY_A), 1);
    assert!(sim.faults().after_charge.is_empty(), "used up");
}
