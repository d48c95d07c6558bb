//! The alert rules of `deploy/prometheus/rules.yml`, unchanged, loaded by a
//! real Prometheus (Debian's `prometheus`, which `.ci/run` installs for
//! `promtool`) scraping a live worker every second. `promtool test rules`
//! proves the rules on synthetic series; this proves them on the metrics the
//! worker really exposes: a real fault makes the alert fire, and its end
//! resolves it.
//!
//! The alert is `CpwApiKeyRefused`, the one whose condition can both start
//! and end within a test: its `for:` is 1 minute, where the others look back
//! over 5 to 15 minutes, so the test waits out that minute rather than
//! rewriting the rule.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use credit_purchase_worker::simulator::FaultsPatch;
use serde_json::Value;

use cpw_testkit::app::{command, command_id, spawn_app};

const ALERT: &str = "CpwApiKeyRefused";

/// The alert's `for:` in rules.yml: it must not fire sooner.
const FOR: Duration = Duration::from_secs(60);

/// A Prometheus server of the test's own: a free port, a temporary data
/// directory, killed (and its directory removed) when dropped, so a failing
/// test leaves no server behind.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    base: String,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts it with the project's rules, scraping `target` every second,
    /// and waits until it is ready.
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let version = std::process::Command::new("prometheus")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            version.is_ok_and(|s| s.success()),
            "no `prometheus` on the PATH: install Debian's package as .ci/run does \
             (apt-get install --no-install-recommends prometheus)"
        );
        let dir = std::env::temp_dir().join(format!("cpw-prometheus-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: credit-purchase-worker\n    static_configs:\n      \
             - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("config written");
        // A free port: asked of the kernel, then handed over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Prometheus {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        prometheus
            .wait(
                "Prometheus to be ready",
                Duration::from_secs(30),
                async |p| {
                    p.http
                        .get(format!("{}/-/ready", p.base))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                },
            )
            .await;
        prometheus
    }

    /// `data` of an API answer; `Value::Null` while it cannot answer.
    async fn api(&self, path: &str) -> Value {
        let answer = self.http.get(format!("{}{path}", self.base)).send().await;
        match answer {
            Ok(r) => r
                .json::<Value>()
                .await
                .map(|v| v["data"].clone())
                .unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// The alert's entry in `/api/v1/alerts`, if it is pending or firing.
    async fn alert(&self) -> Option<Value> {
        let alerts = self.api("/api/v1/alerts").await;
        alerts["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == ALERT)
            .cloned()
    }

    async fn alert_state(&self) -> Option<String> {
        self.alert()
            .await
            .and_then(|a| a["state"].as_str().map(str::to_owned))
    }

    /// The value Prometheus last scraped of the worker's gauge.
    async fn credentials_refused(&self) -> Option<String> {
        let data = self
            .api("/api/v1/query?query=cpw_credentials_refused")
            .await;
        data["result"][0]["value"][1].as_str().map(str::to_owned)
    }

    /// Polls `ready` every 250 ms until it holds; panics with Prometheus' log
    /// once `bound` has passed.
    async fn wait(&self, what: &str, bound: Duration, mut ready: impl AsyncFnMut(&Self) -> bool) {
        let deadline = Instant::now() + bound;
        while !ready(self).await {
            assert!(
                Instant::now() < deadline,
                "gave up after {} s waiting for {what}; Prometheus' log:\n{}",
                bound.as_secs(),
                std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_refused_key_fires_cpw_api_key_refused_on_a_live_prometheus_and_its_end_resolves_it() {
    let mut app = spawn_app().await;
    let prometheus = Prometheus::start(app.ops_addr.expect("worker started")).await;

    // The rules are loaded and the worker is scraped: the gauge reads 0 and
    // the alert is inactive.
    let rules = prometheus.api("/api/v1/rules").await;
    let loaded = rules["groups"][0]["rules"].as_array().is_some_and(|rules| {
        rules
            .iter()
            .any(|r| r["name"] == ALERT && r["health"] != "err")
    });
    assert!(loaded, "{ALERT} is loaded: {rules}");
    prometheus
        .wait(
            "the worker's cpw_credentials_refused scraped at 0",
            Duration::from_secs(30),
            async |p| p.credentials_refused().await.as_deref() == Some("0"),
        )
        .await;
    assert_eq!(
        prometheus.alert_state().await,
        None,
        "no alert while the key is accepted"
    );

    // The fault: Hyperline refuses the key. The worker meets it on a purchase.
    app.set_faults(FaultsPatch {
        reject_auth: Some(true),
        ..FaultsPatch::default()
    });
    let id = command_id();
    app.publish(&command(&id)).await;
    prometheus
        .wait(
            &format!("{ALERT} pending"),
            Duration::from_secs(30),
            async |p| p.alert_state().await.as_deref() == Some("pending"),
        )
        .await;
    let pending = Instant::now();
    prometheus
        .wait(
            &format!("{ALERT} firing"),
            FOR + Duration::from_secs(30),
            async |p| p.alert_state().await.as_deref() == Some("firing"),
        )
        .await;
    assert!(
        pending.elapsed() + Duration::from_secs(3) >= FOR,
        "fired {} s after pending, before its `for:` of {} s",
        pending.elapsed().as_secs(),
        FOR.as_secs()
    );
    let alert = prometheus.alert().await.expect("the firing alert");
    assert_eq!(alert["labels"]["severity"], "page", "{alert}");
    assert!(
        alert["annotations"]["runbook"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "the page names its runbook: {alert}"
    );

    // The fault ends: the worker's next credential probe is accepted (its
    // probes back off to one a minute), the gauge drops, the alert resolves.
    app.set_faults(FaultsPatch {
        reject_auth: Some(false),
        ..FaultsPatch::default()
    });
    prometheus
        .wait(
            &format!("{ALERT} resolved"),
            Duration::from_secs(90),
            async |p| p.alert_state().await.is_none(),
        )
        .await;
    assert_eq!(prometheus.credentials_refused().await.as_deref(), Some("0"));
    // The command waited through the fault and is bought once.
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    assert_eq!(event.command_id(), id);
    app.assert_charged_once(&[id]);
    drop(prometheus);
    app.cleanup().await;
}
