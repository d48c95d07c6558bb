//! Reading the results log (`<results_exchange>.log`, docs/contract.md section 5): a
//! RabbitMQ stream that holds every event the worker published, in the
//! order the broker took them.
//!
//! A stream is read by a consumer that names where to start
//! (`x-stream-offset`: `first`, `last`, an offset, or a timestamp) and never
//! drains: the reader must decide when it has caught up. Over AMQP 0-9-1
//! nothing says at which offset the end is (a stream's `queue.declare-ok`
//! gives at most a count), and a pause in the broker's deliveries is no
//! proof: a reader that stopped at a pause would miss the claims after it,
//! and a charge claimed by another command would look free. So [`read_to_end`] first
//! learns the newest offset (a consumer at `last` gets the newest chunk at
//! once), reads until it has passed it, and only then takes a pause of
//! [`CAUGHT_UP`] as the end; a longer silence before it is an error, never
//! an end. Reading never changes the stream: it is not a queue, and an ack
//! only grants the broker credit for the next messages.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, Consumer};
use time::OffsetDateTime;

pub use super::logged::Logged;
use super::logged::{LogEvidence, claims_and_in_flight};
use crate::configuration::{AmqpSettings, Pem};
use crate::contract::{LANE_HEADER, PUBLISHED_HEADER};

/// Past the newest offset known at the start, a read has caught up when the
/// broker gives nothing more for this long (the broker pushes what is
/// stored without waiting; longer would only make every read slower).
pub const CAUGHT_UP: Duration = Duration::from_millis(1_500);

/// Before the newest offset known at the start, a silence this long is a
/// broker in trouble: the read fails rather than pass for complete.
const STALLED: Duration = Duration::from_secs(30);

/// Messages the broker may push ahead of the reader.
const PREFETCH: u16 = 500;

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// No stream of that name (no log declared, or `amqp.results_log_retention = 0`).
    #[error(
        "the results log `{0}` does not exist: is amqp.results_log_retention 0, or was the \
         topology declared by an older worker? (see `check`)"
    )]
    Missing(String),
    /// The broker refused or dropped the read.
    #[error("cannot read the results log `{log}`: {cause}")]
    Broker {
        log: String,
        /// What went wrong.
        cause: lapin::Error,
    },
    /// The broker could not be reached.
    #[error("cannot reach the broker to read the results log: {0}")]
    Connect(#[from] super::ConnectError),
    /// The broker stopped delivering before the end of the log.
    #[error("the results log `{0}` stopped coming before its end: it could not be read whole")]
    Stalled(String),
    /// The broker ended the read (the stream was deleted, or its node left).
    #[error("the broker ended the read of the results log `{0}`")]
    Cancelled(String),
}

/// Where a read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The oldest event the log still keeps.
    First,
    /// The last chunk the log wrote (its newest events).
    Last,
    /// This offset.
    Offset(u64),
    /// The events written from now on.
    Next,
    /// The first chunk holding an event stored at or after this Unix second
    /// (a chunk may begin a little earlier: filter on [`Entry::at_ms`]).
    At(u64),
}

/// One message of the log.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its offset in the stream.
    pub offset: Option<u64>,
    /// When its event occurred (Unix ms): the event's `occurred_at`, else
    /// the message's `timestamp`.
    pub at_ms: Option<u64>,
    /// When a replica published it (Unix ms, `cpw-published-ms`); `None`
    /// for an event of a worker older than that header.
    pub published_ms: Option<u64>,
    /// What matters of the event, when the body is one.
    pub event: Option<Logged>,
    /// The lane of its command (`cpw-lane`), set where lanes are configured.
    pub lane: Option<String>,
    /// The body as published.
    pub body: Vec<u8>,
}

impl Entry {
    fn from_delivery(delivery: &Delivery) -> Entry {
        let headers = delivery.properties.headers().as_ref();
        let offset = match headers.and_then(|h| h.inner().get("x-stream-offset")) {
            Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).ok(),
            _ => super::header_u64(headers, "x-stream-offset"),
        };
        let event: Option<Logged> = serde_json::from_slice(&delivery.data).ok();
        let occurred = event
            .as_ref()
            .and_then(|e| e.occurred_at.as_deref())
            .and_then(|t| {
                OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .and_then(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok());
        let stamped = delivery
            .properties
            .timestamp()
            .map(|s| s.saturating_mul(1000));
        Entry {
            offset,
            at_ms: occurred.or(stamped),
            published_ms: super::header_u64(headers, PUBLISHED_HEADER),
            lane: super::header_str(headers, LANE_HEADER),
            event,
            body: delivery.data.clone(),
        }
    }
}

/// A consumer on the log.
pub struct Reader {
    log: String,
    channel: Channel,
    consumer: Consumer,
}

impl Reader {
    /// Starts reading `log` at `start`, on a channel of its own (a refused
    /// consume closes its channel).
    pub async fn open(
        connection: &Connection,
        log: &str,
        start: Start,
    ) -> Result<Reader, LogError> {
        Reader::open_with(connection, log, start, PREFETCH).await
    }

    /// [`Reader::open`], with the broker pushing at most `prefetch`
    /// messages ahead of the reader.
    async fn open_with(
        connection: &Connection,
        log: &str,
        start: Start,
        prefetch: u16,
    ) -> Result<Reader, LogError> {
        let broker = |cause| LogError::Broker {
            log: log.to_owned(),
            cause,
        };
        let channel = connection.create_channel().await.map_err(broker)?;
        let passive = QueueDeclareOptions {
            passive: true,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        if let Err(cause) = channel
            .queue_declare(log.into(), passive, FieldTable::default())
            .await
        {
            return Err(match is_not_found(&cause) {
                true => LogError::Missing(log.to_owned()),
                false => broker(cause),
            });
        }
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(broker)?;
        let mut arguments = FieldTable::default();
        let offset = match start {
            Start::First => AMQPValue::LongString(LongString::from("first")),
            Start::Last => AMQPValue::LongString(LongString::from("last")),
            Start::Next => AMQPValue::LongString(LongString::from("next")),
            Start::Offset(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
            Start::At(secs) => AMQPValue::Timestamp(secs),
        };
        arguments.insert(ShortString::from("x-stream-offset"), offset);
        let consumer = channel
            .basic_consume(
                log.into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .map_err(broker)?;
        Ok(Reader {
            log: log.to_owned(),
            channel,
            consumer,
        })
    }

    /// The next entry; `None` once nothing came for `idle` (caught up), or
    /// never with `idle` `None` (following).
    pub async fn next(&mut self, idle: Option<Duration>) -> Result<Option<Entry>, LogError> {
        let next = self.consumer.next();
        let delivery = match idle {
            Some(idle) => match tokio::time::timeout(idle, next).await {
                Ok(d) => d,
                Err(_) => return Ok(None),
            },
            None => next.await,
        };
        let broker = |cause| LogError::Broker {
            log: self.log.clone(),
            cause,
        };
        match delivery {
            Some(Ok(delivery)) => {
                // The ack only grants credit: a stream keeps what is read.
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(broker)?;
                Ok(Some(Entry::from_delivery(&delivery)))
            }
            Some(Err(cause)) => Err(broker(cause)),
            None => Err(LogError::Cancelled(self.log.clone())),
        }
    }

    /// Ends the read; what is not read yet stays in the log, as everything does.
    pub async fn close(self) {
        let _ = self.channel.close(200, "results log read".into()).await;
    }
}

/// From when the log holds every event (Unix ms): when a replica published
/// the oldest kept event that says so (`cpw-published-ms`). Everything
/// written after it is still in the log: a stream drops whole segments,
/// oldest first. Never the event's `occurred_at`: a stored outcome published
/// again keeps it, hours old, and as the log's first entry it made a log
/// that began after a charge pass for one that covers it. Older entries
/// without the header (an older worker's) are read past; `None` when no
/// entry says. The stamp precedes the write by the publish's own wait (the
/// confirm timeout, longer only while a blocked broker holds the publish),
/// which the clock margin of the rules covers.
pub async fn complete_since_ms(
    connection: &Connection,
    log: &str,
) -> Result<Option<u64>, LogError> {
    let mut reader = Reader::open(connection, log, Start::First).await?;
    let since = loop {
        match reader.next(Some(CAUGHT_UP)).await {
            Ok(Some(Entry {
                published_ms: Some(ms),
                ..
            })) => break Ok(Some(ms)),
            Ok(Some(_)) => continue,
            Ok(None) => break Ok(None),
            Err(e) => break Err(e),
        }
    };
    reader.close().await;
    since
}

/// The offset of the newest event, and when it occurred; `None` when the
/// log is empty.
async fn newest(
    connection: &Connection,
    log: &str,
) -> Result<Option<(u64, Option<u64>)>, LogError> {
    let mut reader = Reader::open(connection, log, Start::Last).await?;
    let mut newest: Option<(u64, Option<u64>)> = None;
    // The last chunk comes at once: a short pause ends it.
    let read = loop {
        match reader.next(Some(LAST_CHUNK)).await {
            Ok(Some(entry)) => {
                if let Some(offset) = entry.offset
                    && newest.is_none_or(|(known, _)| offset > known)
                {
                    newest = Some((offset, entry.at_ms));
                }
            }
            Ok(None) => break Ok(newest),
            Err(e) => break Err(e),
        }
    };
    reader.close().await;
    read
}

/// Every entry from `start` to the end of the log: at least up to its
/// newest event when the read began, then whatever follows without a pause
/// of [`CAUGHT_UP`]. A start past the newest event gives none.
pub async fn read_to_end(
    connection: &Connection,
    log: &str,
    start: Start,
) -> Result<Vec<Entry>, LogError> {
    let Some((end, _)) = newest(connection, log).await? else {
        return Ok(Vec::new());
    };
    // A timestamp past the newest chunk attaches after the end, where
    // nothing comes: then the whole log is read and nothing is lost.
    let first_wait = match start {
        Start::At(_) => CAUGHT_UP,
        _ => STALLED,
    };
    match read_until(connection, log, start, end, first_wait).await? {
        Some(entries) => Ok(entries),
        None => Ok(read_until(connection, log, Start::First, end, STALLED)
            .await?
            .unwrap_or_default()),
    }
}

/// Reads from `start` past offset `end`; `None` when nothing came within
/// `first_wait`.
async fn read_until(
    connection: &Connection,
    log: &str,
    start: Start,
    end: u64,
    first_wait: Duration,
) -> Result<Option<Vec<Entry>>, LogError> {
    let mut reader = Reader::open(connection, log, start).await?;
    let mut entries: Vec<Entry> = Vec::new();
    let read = loop {
        let passed = entries
            .last()
            .and_then(|e| e.offset)
            .is_some_and(|o| o >= end);
        let wait = match (entries.is_empty(), passed) {
            (true, _) => first_wait,
            (false, false) => STALLED,
            (false, true) => CAUGHT_UP,
        };
        match reader.next(Some(wait)).await {
            Ok(Some(entry)) => entries.push(entry),
            Ok(None) if entries.is_empty() => break Ok(None),
            Ok(None) if passed => break Ok(Some(entries)),
            Ok(None) => break Err(LogError::Stalled(log.to_owned())),
            Err(e) => break Err(e),
        }
    };
    reader.close().await;
    read
}

/// How many events the log keeps, for a broker whose `queue.declare-ok`
/// reports none for a stream (RabbitMQ 3.10 to 4.x report the count, and
/// the depth sampler reads that): from the offset of the oldest event to
/// that of the first event of the newest chunk, one message read at each
/// end, so short by at most the newest chunk's other events. Never a read
/// to the end: while events are written, a reader at `last` follows them
/// without a pause, and a sampler that read until a pause parsed every
/// event published for ten seconds out of each fifteen. `None` when the
/// log is empty.
pub async fn kept(connection: &Connection, log: &str) -> Result<Option<u64>, LogError> {
    let Some(first) = edge(connection, log, Start::First).await? else {
        return Ok(None);
    };
    let last = edge(connection, log, Start::Last).await?.unwrap_or(first);
    Ok(Some(last.saturating_sub(first).saturating_add(1)))
}

/// The offset of the event at `start`, read with a prefetch of one, so the
/// broker pushes no more than the reader takes.
async fn edge(connection: &Connection, log: &str, start: Start) -> Result<Option<u64>, LogError> {
    let mut reader = Reader::open_with(connection, log, start, 1).await?;
    let entry = reader.next(Some(LAST_CHUNK)).await;
    reader.close().await;
    Ok(entry?.and_then(|e| e.offset))
}

/// Enough for the broker to push what it has at once (one chunk).
const LAST_CHUNK: Duration = Duration::from_millis(300);

/// What the log says from `from_ms` on: every `succeeded` event's claim,
/// the commands in flight, and from when the log is complete.
pub async fn evidence(
    connection: &Connection,
    log: &str,
    from_ms: u64,
) -> Result<LogEvidence, LogError> {
    let complete_since_ms = complete_since_ms(connection, log).await?;
    let entries = read_to_end(connection, log, Start::At(from_ms / 1000)).await?;
    let (succeeded, in_flight) = claims_and_in_flight(entries.into_iter().filter_map(|e| e.event));
    Ok(LogEvidence {
        succeeded,
        in_flight,
        complete_since_ms,
    })
}

/// Where the worker reads the log at a command's closed window: a
/// connection of its own, opened for the read and closed after, since the
/// check is rare (a window that closed without an answer) and must not
/// share the consuming connection's channels or its fate.
#[derive(Clone, Debug)]
pub struct LogSource {
    urls: Vec<String>,
    ca_file: Option<Pem>,
    name: String,
    log: String,
}

/// How long one connection attempt to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl LogSource {
    /// The log of `amqp`'s topology, if one is kept.
    pub fn new(amqp: &AmqpSettings, log: Option<&str>) -> Option<LogSource> {
        Some(LogSource {
            urls: amqp.url.nodes().to_vec(),
            ca_file: amqp.ca_file.clone(),
            name: format!("{} (results log)", amqp.connection_name()),
            log: log?.to_owned(),
        })
    }

    /// [`evidence`], on a connection of its own.
    pub async fn evidence(&self, from_ms: u64) -> Result<LogEvidence, LogError> {
        let (connection, _) = super::connect_first(
            &self.urls,
            0,
            &self.name,
            self.ca_file.as_ref(),
            CONNECT_TIMEOUT,
        )
        .await?;
        let found = evidence(&connection, &self.log, from_ms).await;
        super::close(&connection, "results log read").await;
        found
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}
