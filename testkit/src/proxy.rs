//! A TCP proxy between a worker and the test broker that can slow the
//! broker's answers on cue: what a broker under load looks like from the
//! worker's side (confirms, `basic.cancel-ok`, `channel.close-ok` arriving
//! seconds late) without touching the broker every other test shares.
//!
//! Only the broker-to-worker direction is slowed: what the worker sends
//! (publishes, acks, closes) reaches the broker at once, so a test sees
//! what the broker was told, and when. The bytes keep their order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// A running proxy; it stops, cutting its connections, when dropped.
pub struct Proxy {
    /// The broker URL with the proxy's address in place of the broker's.
    url: String,
    /// How long each chunk the broker sends is held, in milliseconds.
    delay_ms: Arc<AtomicU64>,
    accepting: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to
    /// the broker that `broker_url` names.
    pub async fn start(broker_url: &str) -> Proxy {
        let mut url = url::Url::parse(broker_url).expect("the broker URL parses");
        let host = url.host_str().expect("the broker URL has a host").to_owned();
        let port = url.port().unwrap_or(5672);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let local = listener.local_addr().expect("local address");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(local.port())).expect("port");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = Arc::clone(&delay_ms);
        let accepting = tokio::spawn(async move {
            // Owned here: the connections end with the accept loop.
            let mut connections = JoinSet::new();
            while let Ok((worker, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect((host.as_str(), port)).await else {
                    continue;
                };
                connections.spawn(forward(worker, broker, Arc::clone(&delay)));
            }
        });
        Proxy {
            url: url.to_string(),
            delay_ms,
            accepting,
        }
    }

    /// The URL a worker connects to, through the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// From now on, everything the broker sends reaches the worker `by`
    /// later (zero: at once again).
    pub fn slow_answers(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// One connection: the worker's bytes go straight on; the broker's are
/// stamped with their due time as they are read and written in order once
/// it has come. Either side closing ends both.
async fn forward(worker: TcpStream, broker: TcpStream, delay_ms: Arc<AtomicU64>) {
    let (mut from_worker, mut to_worker) = worker.into_split();
    let (mut from_broker, mut to_broker) = broker.into_split();
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let upstream = async move {
        let _ = tokio::io::copy(&mut from_worker, &mut to_broker).await;
        let _ = to_broker.shutdown().await;
    };
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from_broker.read(&mut buf).await {
            let at = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
            if chunks.send((at, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to_worker.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to_worker.shutdown().await;
    };
    tokio::select! {
        () = upstream => {}
        ((), ()) = async { tokio::join!(read, write) } => {}
    }
}
