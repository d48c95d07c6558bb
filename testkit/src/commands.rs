//! Valid commands, as a publisher following docs/contract.md section 2 writes
//! them: the contract's example with an id of the caller's.

use credit_purchase_worker::contract::Command;
use serde_json::{Value, json};

/// A fresh command id (a UUID: 36 characters of the allowed set).
pub fn command_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A valid command body for `id`: the contract's example, 32 credits for an
/// amount of 24000.
pub fn command(id: &str) -> Value {
    json!({
        "command_id": id,
        "customer_id": "cus_Typ0px2W0aiEtl",
        "product_id": "itm_3kXODDF42QXtnL",
        "credit_count": 32,
        "amount_excluding_tax": 24000,
        "price_id": null,
        "expires_at": null
    })
}

/// A valid command for a given customer (so scripted responses of the
/// simulator can target it).
pub fn command_for(id: &str, customer: &str) -> Value {
    let mut c = command(id);
    c["customer_id"] = json!(customer);
    c
}

/// `body` parsed as the worker parses it; panics if it is not valid.
pub fn parsed(body: &Value) -> Command {
    Command::parse(body.to_string().as_bytes(), None).expect("a valid command")
}
