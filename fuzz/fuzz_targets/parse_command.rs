//! `Command::parse` on arbitrary bytes: a verdict, never a panic.
//!
//! Each input is parsed twice: whole, with no `message_id`; and split, the
//! first byte giving the length of a `message_id` taken from the bytes after
//! it (0 = none), the rest being the body. A valid command must rebuild into
//! a JSON request body and keep its ids inside the contract's character sets;
//! an invalid one must echo only short ids.

#![no_main]

use credit_purchase_worker::contract::{Command, InvalidCommand, MAX_JSON_INTEGER, Pricing};
use credit_purchase_worker::hyperline::{HyperlineClient, purchase_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(Command::parse(data, None));
    if let Some((&first, rest)) = data.split_first() {
        let cut = usize::from(first).min(rest.len());
        let (message_id, body) = rest.split_at(cut);
        let message_id = (first != 0).then(|| String::from_utf8_lossy(message_id));
        check(Command::parse(body, message_id.as_deref()));
    }
});

fn check(verdict: Result<Command, InvalidCommand>) {
    match verdict {
        Ok(command) => valid(&command),
        Err(error) => {
            for id in [
                &error.raw.command_id,
                &error.raw.customer_id,
                &error.raw.product_id,
            ]
            .into_iter()
            .flatten()
            {
                assert!(id.len() <= 255, "echoed an id of {} bytes", id.len());
            }
            assert!(!error.to_string().is_empty());
        }
    }
}

fn valid(command: &Command) {
    let id = command.id.as_str();
    assert!((16..=255).contains(&id.len()), "{id:?}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b)),
        "{id:?}"
    );
    for path_id in [command.customer_id.as_str(), command.product_id.as_str()] {
        assert!((1..=128).contains(&path_id.len()), "{path_id:?}");
        assert!(
            path_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "{path_id:?}"
        );
    }
    let count = command.credit_count.get();
    assert!((1..=MAX_JSON_INTEGER).contains(&count));
    let path = purchase_path(&command.customer_id, &command.product_id);
    assert_eq!(path.matches('/').count(), 6, "{path}");
    let body: serde_json::Value =
        serde_json::from_slice(&HyperlineClient::body(command)).expect("the request body is JSON");
    assert_eq!(body["credit_count"].as_u64(), Some(count));
    match &command.pricing {
        Pricing::Amount(amount) => {
            assert!(*amount <= MAX_JSON_INTEGER);
            assert_eq!(body["amount_excluding_tax"].as_u64(), Some(*amount));
        }
        Pricing::PriceId(price) => {
            assert!((1..=255).contains(&price.as_str().chars().count()));
            assert_eq!(body["price_id"].as_str(), Some(price.as_str()));
        }
    }
    assert_eq!(body["expires_at"].as_str(), command.expires_at.as_deref());
}
