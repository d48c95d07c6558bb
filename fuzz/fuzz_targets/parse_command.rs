//! `Command::parse` on arbitrary bytes: a verdict, never a panic.
//!
//! Each input is parsed twice: whole, with no `message_id`; and split, the
//! first byte giving the length of a `message_id` taken from the bytes after
//! it (0 = none), the rest being the body. Every verdict must keep what
//! `cpw_testkit::rules::check_verdict` asks of it (the property tests ask the
//! same): a valid command keeps the contract's rules and rebuilds into the
//! route's path and a JSON request body; an invalid one echoes only short ids.

#![no_main]

use cpw_testkit::rules::check_verdict;
use credit_purchase_worker::contract::Command;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data, None);
    if let Some((&first, rest)) = data.split_first() {
        let cut = usize::from(first).min(rest.len());
        let (message_id, body) = rest.split_at(cut);
        let message_id = (first != 0).then(|| String::from_utf8_lossy(message_id));
        check(body, message_id.as_deref());
    }
});

fn check(body: &[u8], message_id: Option<&str>) {
    if let Err(broken) = check_verdict(&Command::parse(body, message_id)) {
        panic!("{broken}; message_id {message_id:?}");
    }
}
