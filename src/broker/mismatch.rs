//! An existing topology compared with the one the worker declares.
//!
//! RabbitMQ refuses to redeclare a queue or an exchange with other
//! arguments (PRECONDITION_FAILED), and nothing short of deleting the object
//! changes that: a worker that reconnects on it loops forever, and one that
//! declared its exchanges before meeting the refused queue leaves them
//! half-made. AMQP 0-9-1 cannot read an existing queue's arguments back (a
//! passive declaration answers only "exists", with its counts) and the
//! management API is not always there, so the comparison is the broker's
//! own: each object that exists is declared again, exactly as `run` declares
//! it, on a throwaway channel. An identical declaration changes nothing; a
//! different one is refused with the broker's words naming the first
//! argument that differs, its value on the broker and the value declared.
//! Objects that do not exist are left alone (`check` never creates one).
//! A worker that declares nothing (`amqp.declare_topology = false`) only
//! asks whether each object exists, and stops on the first missing one.
//! Between the passive and the active declaration another client could
//! delete the object, and the active one would then create it: the only
//! window in which `check` declares anything.

use std::fmt;

use lapin::Connection;

use super::topology::{Object, Shape, Topology};

/// The broker's code for a declaration with other arguments.
const PRECONDITION_FAILED: u16 = 406;
/// The broker's code for an object that does not exist.
const NOT_FOUND: u16 = 404;

/// An object of the topology that differs from what the worker declares:
/// it exists with other arguments, or (when the worker declares nothing) it
/// is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// What it is for (`commands queue`).
    pub what: &'static str,
    /// Its name.
    pub name: String,
    /// The argument that differs (`x-queue-type`), as the broker names it,
    /// or `None` when the broker's words could not be read.
    pub argument: Option<String>,
    /// Its value on the broker (`none` when absent).
    pub on_broker: String,
    /// The value the worker declares.
    pub declared: String,
    /// The object does not exist, and `amqp.declare_topology` is false.
    pub missing: bool,
}

impl Mismatch {
    /// An object that does not exist where the worker declares nothing: a
    /// missing delay queue makes every copy to it unroutable, and the
    /// command goes round until its window closes; a missing exchange
    /// closes the channel of every publish to it.
    pub fn missing(object: &Object) -> Mismatch {
        Mismatch {
            what: object.what,
            name: object.name.clone(),
            argument: None,
            on_broker: "missing".to_owned(),
            declared: String::new(),
            missing: true,
        }
    }

    /// Reads a refusal: `Some` only for PRECONDITION_FAILED.
    pub fn from_refusal(what: &'static str, name: &str, e: &lapin::Error) -> Option<Mismatch> {
        let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
            return None;
        };
        if amqp.get_id() != PRECONDITION_FAILED {
            return None;
        }
        let text = amqp.get_message().as_str();
        let parsed = parse(text);
        Some(Mismatch {
            what,
            name: name.to_owned(),
            argument: parsed.as_ref().map(|p| p.0.clone()),
            on_broker: parsed
                .as_ref()
                .map_or_else(|| text.to_owned(), |p| p.2.clone()),
            declared: parsed.map(|p| p.1).unwrap_or_default(),
            missing: false,
        })
    }

    /// How to make the two agree.
    fn fix(&self) -> String {
        // A quorum queue carries x-dead-letter-strategy and x-overflow, a
        // classic one neither: a difference there is a difference of type.
        let setting = match self.argument.as_deref() {
            Some("x-queue-type" | "x-dead-letter-strategy" | "x-overflow") => {
                Some("amqp.queue_type")
            }
            Some("x-delivery-limit") => Some("amqp.delivery_limit` (or `amqp.queue_type"),
            Some("x-message-ttl") => Some("retry.redelivery_delays_secs"),
            _ => None,
        };
        let recreate = match self.what {
            w if w.ends_with("exchange") => format!(
                "delete the exchange (`rabbitmqadmin delete exchange name={}`) and let the worker \
                 declare it",
                self.name
            ),
            _ => format!(
                "move its messages away (a shovel), delete it (`rabbitmqctl delete_queue {}`) and \
                 let the worker declare it",
                self.name
            ),
        };
        match setting {
            Some(key) => format!("set `{key}` to match the broker, or {recreate}"),
            None => format!("{recreate} (arguments of an existing object cannot change)"),
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.missing {
            let kind = match self.what.ends_with("exchange") {
                true => "exchange",
                false => "queue",
            };
            return write!(
                f,
                "{} `{}` is missing and amqp.declare_topology = false, so the worker declares \
                 nothing: declare the {kind} where the topology is managed (`check` lists what \
                 is missing), or set amqp.declare_topology = true",
                self.what, self.name
            );
        }
        match &self.argument {
            Some(argument) => write!(
                f,
                "{} `{}` exists with {argument} = {} where the worker declares {}: {}",
                self.what,
                self.name,
                self.on_broker,
                self.declared,
                self.fix()
            ),
            None => write!(
                f,
                "{} `{}` exists with other arguments than the worker declares ({}): {}",
                self.what,
                self.name,
                self.on_broker,
                self.fix()
            ),
        }
    }
}

impl std::error::Error for Mismatch {}

/// `(argument, declared, on the broker)` from the broker's words:
/// `PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in
/// vhost '/': received the value 'quorum' of type 'longstr' but current is
/// none`, or, for an exchange, `... received 'fanout' but current is 'direct'`.
fn parse(text: &str) -> Option<(String, String, String)> {
    let rest = text.split_once("inequivalent arg '")?.1;
    let (argument, rest) = rest.split_once('\'')?;
    let (received, current) = rest
        .split_once(": received ")?
        .1
        .split_once(" but current is ")?;
    Some((argument.to_owned(), value(received), value(current)))
}

/// `the value 'quorum' of type 'longstr'` → `'quorum'`; `none` → `none`.
fn value(text: &str) -> String {
    let text = text.trim();
    match text
        .strip_prefix("the value ")
        .and_then(|v| v.rsplit_once(" of type "))
    {
        Some((v, _)) => v.to_owned(),
        None => text.to_owned(),
    }
}

/// What an object of the topology looks like on the broker.
#[derive(Debug)]
pub enum Finding {
    /// It exists as the worker declares it; a queue's ready messages.
    Matches(u32),
    /// It does not exist.
    Missing,
    /// It exists with other arguments.
    Differs(Mismatch),
    /// The broker would not say (a permission, a closed connection).
    Unknown(lapin::Error),
}

impl Topology {
    /// Compares each object with the broker, in declaration order.
    pub async fn compare(&self, connection: &Connection) -> Vec<(Object, Finding)> {
        let mut findings = Vec::new();
        for object in self.objects() {
            let finding = compare(connection, &object).await;
            findings.push((object, finding));
        }
        findings
    }

    /// The first object that does not exist, for a worker that declares
    /// nothing: `run` stops on it rather than loop on what it makes of
    /// every publish to it. Only asks (passive declarations); an object the
    /// broker would not say anything about is left to fail where it is used.
    pub async fn first_missing(&self, connection: &Connection) -> Result<(), Mismatch> {
        for object in self.objects() {
            if let Err(e) = exists(connection, &object).await
                && is(&e, NOT_FOUND)
            {
                return Err(Mismatch::missing(&object));
            }
        }
        Ok(())
    }

    /// The first object that exists with other arguments, before anything
    /// is declared: `run` stops on it rather than loop on the refusal.
    pub async fn first_mismatch(&self, connection: &Connection) -> Result<(), Mismatch> {
        for object in self.objects() {
            if let Finding::Differs(mismatch) = compare(connection, &object).await {
                return Err(mismatch);
            }
        }
        Ok(())
    }
}

/// A passive declaration of `object`, on a channel of its own (a missing
/// object closes the channel it is asked on).
async fn exists(connection: &Connection, object: &Object) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    object.declare(&channel, true).await?;
    let _ = channel.close(200, "looked".into()).await;
    Ok(())
}

async fn compare(connection: &Connection, object: &Object) -> Finding {
    match exists(connection, object).await {
        Ok(_) => {}
        Err(e) if is(&e, NOT_FOUND) => return Finding::Missing,
        Err(e) => return Finding::Unknown(e),
    }
    // On a channel of its own: a refusal closes the channel.
    let declare = async {
        let channel = connection.create_channel().await?;
        let out = object.declare(&channel, false).await;
        if out.is_ok() {
            let _ = channel.close(200, "compared".into()).await;
        }
        out
    };
    match declare.await {
        Ok(ready) => Finding::Matches(match object.shape {
            Shape::Queue(_) => ready,
            Shape::Exchange(_) => 0,
        }),
        Err(e) => match Mismatch::from_refusal(object.what, &object.name, &e) {
            // A queue an earlier release created is kept as it is (see
            // `Topology::declare`).
            Some(mismatch) => {
                for (older, _) in object.earlier_forms() {
                    if let Finding::Matches(ready) = Box::pin(compare(connection, &older)).await {
                        return Finding::Matches(ready);
                    }
                }
                Finding::Differs(mismatch)
            }
            None => Finding::Unknown(e),
        },
    }
}

fn is(e: &lapin::Error, code: u16) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brokers_words_are_read() {
        let queue = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost \
                     '/': received the value 'quorum' of type 'longstr' but current is none";
        assert_eq!(
            parse(queue),
            Some(("x-queue-type".into(), "'quorum'".into(), "none".into()))
        );
        let exchange = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost \
                        '/': received 'fanout' but current is 'direct'";
        assert_eq!(
            parse(exchange),
            Some(("type".into(), "'fanout'".into(), "'direct'".into()))
        );
        assert_eq!(parse("PRECONDITION_FAILED - something else"), None);
    }
}
