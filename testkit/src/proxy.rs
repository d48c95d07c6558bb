//! A TCP proxy between a worker and the test broker that can slow the
//! broker's answers on cue, or hold back one publisher confirm: what a
//! broker under load looks like from the worker's side (confirms,
//! `basic.cancel-ok`, `channel.close-ok` arriving late) without touching the
//! broker every other test shares.
//!
//! Only the broker-to-worker direction is changed: what the worker sends
//! (publishes, acks, closes) reaches the broker at once, so a test knows
//! what the broker was told, and when. The broker's frames are read whole
//! and passed on in order, except for one held confirm (see
//! [`Proxy::hold_next_confirm`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// AMQP 0-9-1 frame types and the methods the proxy tells apart.
const METHOD_FRAME: u8 = 1;
const BASIC: u16 = 60;
const BASIC_RETURN: u16 = 50;
const BASIC_ACK: u16 = 80;
/// Type (1), channel (2), payload size (4).
const FRAME_HEADER: usize = 7;

/// A running proxy; it stops, cutting its connections, when dropped.
pub struct Proxy {
    /// The broker URL with the proxy's address in place of the broker's.
    url: String,
    /// How long each frame the broker sends is held, in milliseconds.
    delay_ms: Arc<AtomicU64>,
    hold: Arc<Mutex<Hold>>,
    accepting: JoinHandle<()>,
}

/// The one publisher confirm held back, if asked for.
#[derive(Default)]
enum Hold {
    #[default]
    Off,
    /// The next `basic.ack` the broker sends is held.
    Armed,
    /// This ack, of that channel, is held until the next method on the
    /// channel that is not a `basic.return`.
    Holding { channel: u16, frame: Vec<u8> },
    /// Held, then passed on.
    Released,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to
    /// the broker that `broker_url` names.
    pub async fn start(broker_url: &str) -> Proxy {
        let mut url = url::Url::parse(broker_url).expect("the broker URL parses");
        let host = url
            .host_str()
            .expect("the broker URL has a host")
            .to_owned();
        let port = url.port().unwrap_or(5672);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let local = listener.local_addr().expect("local address");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(local.port())).expect("port");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let hold = Arc::new(Mutex::new(Hold::Off));
        let shared = (Arc::clone(&delay_ms), Arc::clone(&hold));
        let accepting = tokio::spawn(async move {
            // Owned here: the connections end with the accept loop.
            let mut connections = JoinSet::new();
            while let Ok((worker, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect((host.as_str(), port)).await else {
                    continue;
                };
                let (delay, hold) = (Arc::clone(&shared.0), Arc::clone(&shared.1));
                connections.spawn(forward(worker, broker, delay, hold));
            }
        });
        Proxy {
            url: url.to_string(),
            delay_ms,
            hold,
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

    /// Holds back the next publisher confirm (`basic.ack`) the broker
    /// sends, until the next method on its channel that is not a
    /// `basic.return`: the ack then arrives after the return of the next
    /// publish on the channel, as when the broker acks both publishes at
    /// once (`multiple`) and the client resolves the older first.
    pub fn hold_next_confirm(&self) {
        *lock(&self.hold) = Hold::Armed;
    }

    /// Whether a confirm is held back now.
    pub fn holding(&self) -> bool {
        matches!(*lock(&self.hold), Hold::Holding { .. })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

fn lock(hold: &Mutex<Hold>) -> std::sync::MutexGuard<'_, Hold> {
    hold.lock().unwrap_or_else(|p| p.into_inner())
}

/// The frames to pass on now for one frame of the broker.
fn filter(hold: &Mutex<Hold>, frame: Vec<u8>) -> Vec<Vec<u8>> {
    let channel = u16::from_be_bytes([frame[1], frame[2]]);
    let method = (frame[0] == METHOD_FRAME && frame.len() >= FRAME_HEADER + 4).then(|| {
        let at =
            |i: usize| u16::from_be_bytes([frame[FRAME_HEADER + i], frame[FRAME_HEADER + i + 1]]);
        (at(0), at(2))
    });
    let mut hold = lock(hold);
    match (&*hold, method) {
        (Hold::Armed, Some((BASIC, BASIC_ACK))) => {
            *hold = Hold::Holding { channel, frame };
            Vec::new()
        }
        (Hold::Holding { channel: held, .. }, Some(method))
            if *held == channel && method != (BASIC, BASIC_RETURN) =>
        {
            let Hold::Holding { frame: held, .. } = std::mem::replace(&mut *hold, Hold::Released)
            else {
                unreachable!("matched above")
            };
            vec![held, frame]
        }
        _ => vec![frame],
    }
}

/// One connection: the worker's bytes go straight on; the broker's are cut
/// into frames, stamped with their due time as they are read, and written
/// in order once it has come. Either side closing ends both.
async fn forward(
    worker: TcpStream,
    broker: TcpStream,
    delay_ms: Arc<AtomicU64>,
    hold: Arc<Mutex<Hold>>,
) {
    let (mut from_worker, mut to_worker) = worker.into_split();
    let (mut from_broker, mut to_broker) = broker.into_split();
    let (frames, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let upstream = async move {
        let _ = tokio::io::copy(&mut from_worker, &mut to_broker).await;
        let _ = to_broker.shutdown().await;
    };
    let read = async move {
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from_broker.read(&mut buf).await {
            pending.extend_from_slice(&buf[..n]);
            let at = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
            while let Some(frame) = next_frame(&mut pending) {
                for out in filter(&hold, frame) {
                    if frames.send((at, out)).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((at, frame)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to_worker.write_all(&frame).await.is_err() {
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

/// The first whole frame of `pending`, taken out of it.
fn next_frame(pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let header = pending.get(..FRAME_HEADER)?;
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    let whole = FRAME_HEADER + size + 1;
    (pending.len() >= whole).then(|| pending.drain(..whole).collect())
}
