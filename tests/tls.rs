//! `https://` through rustls with a private CA: trusted when
//! `hyperline.ca_file` names it, refused otherwise.

use cpw_testkit::app::start_simulator;
use std::sync::Arc;

use credit_purchase_worker::configuration::{ApiKey, Settings};
use credit_purchase_worker::contract::Command;
use credit_purchase_worker::hyperline::{FinalAnswer, HyperlineClient, PurchaseAnswer};
use credit_purchase_worker::simulator::{Faults, SimulatorSettings};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA, and a certificate for `localhost` signed by it.
fn private_ca() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (ca.pem(), cert.der().clone(), der)
}

/// A TLS endpoint that forwards to the (plain HTTP) simulator.
async fn tls_front(
    target: std::net::SocketAddr,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> u16 {
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

fn command() -> Command {
    cpw_testkit::commands::parsed(&cpw_testkit::commands::command("tls-test-0000000000001"))
}

fn client(base: &str, ca_file: Option<&std::path::Path>) -> HyperlineClient {
    let mut env = vec![
        ("CPW__HYPERLINE__BASE_URL".to_owned(), base.to_owned()),
        ("CPW__HYPERLINE__TIMEOUT_SECS".to_owned(), "5".to_owned()),
    ];
    if let Some(path) = ca_file {
        env.push((
            "CPW__HYPERLINE__CA_FILE".to_owned(),
            path.to_string_lossy().into_owned(),
        ));
    }
    let settings = Settings::load_from(None, env).expect("settings");
    HyperlineClient::new(&settings.hyperline, ApiKey::new("sim_test_key")).expect("client")
}

#[tokio::test]
async fn a_private_ca_is_trusted_only_when_configured() {
    let sim = start_simulator(SimulatorSettings {
        faults: Faults {
            rate_limit: 0,
            ..Faults::default()
        },
        ..SimulatorSettings::default()
    })
    .await;
    let (ca_pem, cert, key) = private_ca();
    let port = tls_front(sim.addr(), cert, key).await;
    let base = format!("https://localhost:{port}");
    let ca_path = std::env::temp_dir().join(format!("cpw-test-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_path, ca_pem).expect("write ca");

    let untrusting = client(&base, None);
    let refused = untrusting.purchase(&command(), None).await;
    assert!(
        matches!(
            refused.answer,
            PurchaseAnswer::Transient { status: None, .. }
        ),
        "{refused:?}"
    );
    assert!(
        sim.requests().is_empty(),
        "nothing crossed an untrusted TLS session"
    );

    let trusting = client(&base, Some(&ca_path));
    let bought = trusting.purchase(&command(), None).await;
    assert!(
        matches!(
            bought.answer,
            PurchaseAnswer::Final(FinalAnswer::Succeeded(_))
        ),
        "{bought:?}"
    );
    assert_eq!(sim.ledger().charges.len(), 1);
    let _ = std::fs::remove_file(ca_path);
}

#[test]
fn a_ca_file_that_is_not_pem_is_refused_at_start() {
    let path = std::env::temp_dir().join(format!("cpw-test-notpem-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, "not a certificate").expect("write");
    for key in ["CPW__HYPERLINE__CA_FILE", "CPW__AMQP__CA_FILE"] {
        let err = Settings::load_from(
            None,
            [(key.to_owned(), path.to_string_lossy().into_owned())],
        )
        .expect_err("refused");
        assert!(err.to_string().contains("ca_file"), "{err}");
    }
    let _ = std::fs::remove_file(path);
}
