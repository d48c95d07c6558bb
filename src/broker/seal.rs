//! Proof that a copy's memory was written by the worker.
//!
//! Anyone who may publish to the commands queue can set any header. Without
//! proof, a publisher who copies the `cpw-*` headers of one of the worker's
//! copies onto a new command gets an event with no purchase (a stored
//! outcome), a window closed at once or switched off (a forged first
//! attempt), or a step skipped. So every copy carries `cpw-mac`: an
//! HMAC-SHA256 over the body, the message id and every `cpw-*` header, in
//! the headers' own (sorted) order, with a key every replica has and no
//! publisher does. The body and the message id are inside the MAC so that
//! memory lifted from one command does not verify on another.

use hmac::{Hmac, Mac};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sha2::Sha256;

use crate::configuration::{ConfigError, HistoryKey, Settings};

/// The header that carries the MAC (hex), itself outside the MAC.
pub const MAC_HEADER: &str = "cpw-mac";

/// Separates this MAC from any other use of the same key.
const DOMAIN: &[u8] = b"credit-purchase-worker history v1";

/// The fixed label of the key derived from the API key: the derived key
/// authenticates the memory and nothing else, so knowing it (a dump of a
/// copy's MAC) tells nothing about the API key.
const DERIVATION_LABEL: &[u8] = b"credit-purchase-worker history key v1";

type HmacSha256 = Hmac<Sha256>;

/// The keys of the worker's memory: the first signs, every one verifies (a
/// rotation puts the new key first and keeps the old one until every copy
/// signed with it has come back).
#[derive(Clone)]
pub struct HistoryKeys {
    keys: Vec<Vec<u8>>,
    /// Where each key comes from, in the same order, for `check`.
    origins: Vec<KeyOrigin>,
}

/// Where a history key comes from: what `check` names, never the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Entry `n` (1-based) of the configured list, a key given as it is.
    Configured(usize),
    /// Entry `n` of the configured list, `derived-from-api-key`.
    DerivedEntry(usize),
    /// No key configured: the key derived from the API key.
    DerivedByDefault,
}

impl std::fmt::Display for KeyOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyOrigin::Configured(n) => write!(f, "entry {n} (a configured key)"),
            KeyOrigin::DerivedEntry(n) => {
                write!(f, "entry {n} (the key derived from hyperline.api_key)")
            }
            KeyOrigin::DerivedByDefault => f.write_str(
                "the key derived from hyperline.api_key (no worker.history_keys configured)",
            ),
        }
    }
}

impl std::fmt::Debug for HistoryKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HistoryKeys([REDACTED] x{})", self.keys.len())
    }
}

/// What a delivery's memory turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// No `cpw-*` header at all: a command never seen before.
    Blank,
    /// Written by a replica with one of our keys.
    Verified,
    /// `cpw-*` headers whose MAC is missing or wrong: the publisher's word.
    Rejected,
}

impl HistoryKeys {
    /// The configured keys (`worker.history_keys`), or, when none is set, a
    /// key derived from the API key, so a default deployment is protected
    /// with no new secret; a configured `derived-from-api-key` entry stands
    /// for that key, so copies signed with it still verify after a move to
    /// explicit keys. `None` when no key can be had (an admin command run
    /// without the API key: nothing it reads is believed). An entry that
    /// stands for the derived key is left out without the API key: a reader
    /// verifies with the others ([`HistoryKeys::require`] refuses it as the
    /// signer).
    pub fn from_settings(settings: &Settings) -> Option<HistoryKeys> {
        let derived = || {
            let api_key = settings.hyperline.api_key.as_ref()?;
            Some(derive(api_key.expose().as_bytes()))
        };
        let configured = &settings.worker.history_keys;
        if configured.is_empty() {
            return Some(HistoryKeys {
                keys: vec![derived()?],
                origins: vec![KeyOrigin::DerivedByDefault],
            });
        }
        let (keys, origins) = configured
            .iter()
            .zip(1..)
            .filter_map(|(entry, n)| match entry {
                HistoryKey::Explicit(key) => {
                    Some((key.expose().as_bytes().to_vec(), KeyOrigin::Configured(n)))
                }
                HistoryKey::DerivedFromApiKey => Some((derived()?, KeyOrigin::DerivedEntry(n))),
            })
            .unzip::<_, _, Vec<_>, Vec<_>>();
        (!keys.is_empty()).then_some(HistoryKeys { keys, origins })
    }

    /// [`HistoryKeys::from_settings`], for a tool that writes memory (a
    /// replay keeps a letter's window): without its signing key it could
    /// only write memory no replica believes.
    pub fn require(settings: &Settings) -> Result<HistoryKeys, ConfigError> {
        let signer_missing = settings.worker.history_keys.first()
            == Some(&HistoryKey::DerivedFromApiKey)
            && settings.hyperline.api_key.is_none();
        match HistoryKeys::from_settings(settings) {
            Some(keys) if !signer_missing => Ok(keys),
            _ if signer_missing => Err(ConfigError::Invalid {
                key: "worker.history_keys",
                reason: "starts with derived-from-api-key, the key derived from \
                         hyperline.api_key, which is not set: the worker's memory on a copy \
                         cannot be signed"
                    .into(),
            }),
            _ => Err(ConfigError::Invalid {
                key: "hyperline.api_key",
                reason: "is not set, nor worker.history_keys: the worker's memory on a copy \
                         can be neither verified nor signed without one of them"
                    .into(),
            }),
        }
    }

    /// The key derived from `secret` with a fixed label.
    pub fn derived(secret: &[u8]) -> HistoryKeys {
        HistoryKeys {
            keys: vec![derive(secret)],
            origins: vec![KeyOrigin::DerivedByDefault],
        }
    }

    /// Where the signing key comes from.
    pub fn signer(&self) -> Option<&KeyOrigin> {
        self.origins.first()
    }

    /// Where each verifying key comes from, the signer first.
    pub fn verifiers(&self) -> &[KeyOrigin] {
        &self.origins
    }

    /// Adds the MAC of `headers` (with the body and message id) to them.
    /// `headers` hold no MAC yet: a copy's headers are built without any of
    /// the original's `cpw-*` ones.
    pub fn seal(&self, headers: &mut FieldTable, body: &[u8], message_id: Option<&str>) {
        let Some(key) = self.keys.first() else {
            return;
        };
        let Some(mac) = compute(key, headers, body, message_id) else {
            return;
        };
        headers.insert(
            ShortString::from(MAC_HEADER),
            AMQPValue::LongString(LongString::from(hex::encode(mac.finalize().into_bytes()))),
        );
    }

    /// Whether the `cpw-*` headers were written by a replica: a MAC that one
    /// of the keys verifies, compared in constant time.
    pub fn provenance(
        keys: Option<&HistoryKeys>,
        headers: Option<&FieldTable>,
        body: &[u8],
        message_id: Option<&str>,
    ) -> Provenance {
        let Some(headers) = headers.filter(|h| h.inner().keys().any(|k| is_ours(k.as_str())))
        else {
            return Provenance::Blank;
        };
        let claimed = match headers.inner().get(MAC_HEADER) {
            Some(AMQPValue::LongString(s)) => hex::decode(s.as_bytes()).ok(),
            Some(AMQPValue::ShortString(s)) => hex::decode(s.as_str()).ok(),
            _ => None,
        };
        let verified = claimed.is_some_and(|claimed| {
            keys.into_iter().flat_map(|k| &k.keys).any(|key| {
                compute(key, headers, body, message_id)
                    .is_some_and(|mac| mac.verify_slice(&claimed).is_ok())
            })
        });
        match verified {
            true => Provenance::Verified,
            false => Provenance::Rejected,
        }
    }
}

/// Whether a header is one of the worker's own.
pub fn is_ours(key: &str) -> bool {
    key.starts_with("cpw-")
}

/// The key derived from `secret` (the API key) with a fixed label.
fn derive(secret: &[u8]) -> Vec<u8> {
    keyed(secret)
        .chain_update(DERIVATION_LABEL)
        .finalize()
        .into_bytes()
        .to_vec()
}

fn keyed(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// Each part length-prefixed, so no two different messages feed the MAC
/// the same bytes. `None` when a `cpw-*` header has a type the worker never
/// writes: such a memory is not ours.
fn compute(
    key: &[u8],
    headers: &FieldTable,
    body: &[u8],
    message_id: Option<&str>,
) -> Option<HmacSha256> {
    let mut mac = keyed(key);
    mac.update(DOMAIN);
    part(&mut mac, body);
    match message_id {
        Some(id) => {
            mac.update(&[1]);
            part(&mut mac, id.as_bytes());
        }
        None => mac.update(&[0]),
    }
    for (name, value) in headers.inner() {
        let name = name.as_str();
        if !is_ours(name) || name == MAC_HEADER {
            continue;
        }
        part(&mut mac, name.as_bytes());
        match value {
            AMQPValue::LongString(s) => {
                mac.update(b"s");
                part(&mut mac, s.as_bytes());
            }
            AMQPValue::LongLongInt(n) => {
                mac.update(b"l");
                mac.update(&n.to_be_bytes());
            }
            _ => return None,
        }
    }
    Some(mac)
}

fn part(mac: &mut HmacSha256, bytes: &[u8]) {
    mac.update(&(bytes.len() as u64).to_be_bytes());
    mac.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: &str) -> HistoryKeys {
        HistoryKeys::derived(secret.as_bytes())
    }

    fn memory() -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert("cpw-attempts".into(), AMQPValue::LongLongInt(3));
        headers.insert(
            "cpw-outcome".into(),
            AMQPValue::LongString(r#"{"kind":"succeeded"}"#.into()),
        );
        headers.insert("traceparent".into(), AMQPValue::LongString("00-ab".into()));
        headers
    }

    #[test]
    fn a_sealed_memory_verifies_with_any_of_the_keys() {
        let mut headers = memory();
        keys("old").seal(&mut headers, b"body", Some("m1"));
        let rotated = HistoryKeys {
            keys: [keys("new").keys, keys("old").keys].concat(),
            origins: vec![KeyOrigin::Configured(1), KeyOrigin::Configured(2)],
        };
        let read =
            |k: &HistoryKeys| HistoryKeys::provenance(Some(k), Some(&headers), b"body", Some("m1"));
        assert_eq!(read(&keys("old")), Provenance::Verified);
        assert_eq!(read(&rotated), Provenance::Verified);
        assert_eq!(read(&keys("other")), Provenance::Rejected);
        assert_eq!(
            HistoryKeys::provenance(None, Some(&headers), b"body", Some("m1")),
            Provenance::Rejected
        );
    }

    #[test]
    fn memory_moved_to_another_message_or_altered_does_not_verify() {
        let k = keys("k");
        let mut headers = memory();
        k.seal(&mut headers, b"body", Some("m1"));
        let read =
            |h: &FieldTable, body: &[u8], id| HistoryKeys::provenance(Some(&k), Some(h), body, id);
        assert_eq!(read(&headers, b"body", Some("m1")), Provenance::Verified);
        assert_eq!(
            read(&headers, b"other body", Some("m1")),
            Provenance::Rejected
        );
        assert_eq!(read(&headers, b"body", Some("m2")), Provenance::Rejected);
        assert_eq!(read(&headers, b"body", None), Provenance::Rejected);
        let mut altered = headers.clone();
        altered.insert("cpw-attempts".into(), AMQPValue::LongLongInt(0));
        assert_eq!(read(&altered, b"body", Some("m1")), Provenance::Rejected);
        let mut added = headers.clone();
        added.insert("cpw-step".into(), AMQPValue::LongLongInt(1));
        assert_eq!(read(&added, b"body", Some("m1")), Provenance::Rejected);
        let mut retyped = headers.clone();
        retyped.insert("cpw-attempts".into(), AMQPValue::LongString("3".into()));
        assert_eq!(read(&retyped, b"body", Some("m1")), Provenance::Rejected);
        // Headers that are not ours may change on the way (a tracing hop).
        let mut foreign = headers.clone();
        foreign.insert("traceparent".into(), AMQPValue::LongString("00-cd".into()));
        assert_eq!(read(&foreign, b"body", Some("m1")), Provenance::Verified);
    }

    #[test]
    fn no_memory_is_blank_and_memory_without_a_mac_is_rejected() {
        let k = keys("k");
        let mut plain = FieldTable::default();
        plain.insert("traceparent".into(), AMQPValue::LongString("00-ab".into()));
        assert_eq!(
            HistoryKeys::provenance(Some(&k), Some(&plain), b"b", None),
            Provenance::Blank
        );
        assert_eq!(
            HistoryKeys::provenance(Some(&k), None, b"b", None),
            Provenance::Blank
        );
        assert_eq!(
            HistoryKeys::provenance(Some(&k), Some(&memory()), b"b", None),
            Provenance::Rejected
        );
    }

    #[test]
    fn the_derived_key_is_not_the_api_key_and_prints_nothing() {
        let k = keys("sk_live_secret");
        assert_ne!(k.keys[0], b"sk_live_secret".to_vec());
        assert_eq!(k.keys[0].len(), 32);
        assert!(!format!("{k:?}").contains("sk_live"));
    }

    #[test]
    fn the_derived_key_kept_beside_explicit_keys_still_verifies_its_copies() {
        let api_key = "sk_live_secret";
        let explicit = "e".repeat(64);
        let settings = |keys: Option<String>| {
            let mut env = vec![("CPW__HYPERLINE__API_KEY".to_owned(), api_key.to_owned())];
            env.extend(keys.map(|k| ("CPW__WORKER__HISTORY_KEYS".to_owned(), k)));
            Settings::load_from(None, env).expect("valid settings")
        };
        let mut headers = memory();
        let before = HistoryKeys::from_settings(&settings(None)).expect("derived");
        assert_eq!(before.signer(), Some(&KeyOrigin::DerivedByDefault));
        before.seal(&mut headers, b"body", Some("m1"));
        let read =
            |k: &HistoryKeys| HistoryKeys::provenance(Some(k), Some(&headers), b"body", Some("m1"));

        let moved = settings(Some(explicit.clone()));
        let moved = HistoryKeys::from_settings(&moved).expect("explicit");
        assert_eq!(
            read(&moved),
            Provenance::Rejected,
            "dropped, it verifies nothing"
        );

        let kept = settings(Some(format!("{explicit},derived-from-api-key")));
        let kept = HistoryKeys::from_settings(&kept).expect("both");
        assert_eq!(read(&kept), Provenance::Verified);
        assert_eq!(kept.signer(), Some(&KeyOrigin::Configured(1)));
        assert_eq!(
            kept.verifiers(),
            [KeyOrigin::Configured(1), KeyOrigin::DerivedEntry(2)]
        );
        let mut resealed = memory();
        kept.seal(&mut resealed, b"body", Some("m1"));
        let by_explicit_only =
            HistoryKeys::provenance(Some(&moved), Some(&resealed), b"body", Some("m1"));
        assert_eq!(
            by_explicit_only,
            Provenance::Verified,
            "the explicit key signs"
        );
    }

    #[test]
    fn a_derived_entry_without_the_api_key_verifies_nothing_and_cannot_sign() {
        let explicit = "e".repeat(64);
        let load = |keys: String| {
            Settings::load_from(None, [("CPW__WORKER__HISTORY_KEYS".to_owned(), keys)])
                .expect("valid settings")
        };
        let first = load(format!("derived-from-api-key,{explicit}"));
        let readers = HistoryKeys::from_settings(&first).expect("the explicit key");
        assert_eq!(readers.verifiers(), [KeyOrigin::Configured(2)]);
        let refused = HistoryKeys::require(&first).expect_err("no signer");
        assert!(
            refused.to_string().contains("worker.history_keys"),
            "{refused}"
        );
        let second = load(format!("{explicit},derived-from-api-key"));
        assert!(HistoryKeys::require(&second).is_ok());
    }
}
