//! The minimal honest loop: consume → one POST → publish the result with a
//! confirm → ack, one task per delivery. Runs as a child of the bench so its
//! CPU and memory are measured exactly like the worker's.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Deserialize;

use crate::SIM_KEY;

#[derive(Deserialize)]
struct Cmd<'a> {
    command_id: &'a str,
    customer_id: &'a str,
    product_id: &'a str,
    credit_count: u64,
    amount_excluding_tax: Option<u64>,
}

#[derive(Deserialize)]
struct Receipt {
    invoice_id: String,
    new_credit_balance: u64,
}

struct Ctx {
    http: reqwest::Client,
    publisher: Channel,
    sim: String,
    results: String,
}

fn var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

pub async fn run() -> Result<()> {
    let prefetch: u16 = var("BASELINE_PREFETCH")?.parse()?;
    let queue = var("BASELINE_QUEUE")?;
    let connection =
        Connection::connect(&var("BASELINE_AMQP_URL")?, ConnectionProperties::default()).await?;
    let consuming = connection.create_channel().await?;
    consuming
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let ctx = Arc::new(Ctx {
        http: reqwest::Client::new(),
        publisher,
        sim: var("BASELINE_SIM")?,
        results: var("BASELINE_RESULTS")?,
    });
    let mut consumer = consuming
        .basic_consume(
            queue.as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            if let Err(e) = handle(&ctx, &delivery).await {
                eprintln!("baseline: {e:#}");
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                let _ = delivery.acker.nack(requeue).await;
            }
        });
    }
    Ok(())
}

async fn handle(ctx: &Ctx, delivery: &lapin::message::Delivery) -> Result<()> {
    let cmd: Cmd = serde_json::from_slice(&delivery.data)?;
    let url = format!(
        "{}/v1/customers/{}/credits/{}/purchase",
        ctx.sim, cmd.customer_id, cmd.product_id
    );
    let response = ctx
        .http
        .post(url)
        .bearer_auth(SIM_KEY)
        .header("Idempotency-Key", cmd.command_id)
        .json(&serde_json::json!({
            "credit_count": cmd.credit_count,
            "amount_excluding_tax": cmd.amount_excluding_tax,
        }))
        .send()
        .await?;
    if response.status().as_u16() != 201 {
        bail!("HTTP {}", response.status());
    }
    let receipt: Receipt = response.json().await?;
    let event = serde_json::json!({
        "type": "credit_purchase.succeeded",
        "command_id": cmd.command_id,
        "customer_id": cmd.customer_id,
        "product_id": cmd.product_id,
        "credit_count": cmd.credit_count,
        "invoice_id": receipt.invoice_id,
        "new_credit_balance": receipt.new_credit_balance,
    });
    let confirm = ctx
        .publisher
        .basic_publish(
            ctx.results.as_str().into(),
            "credit_purchase.succeeded".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&event)?,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_type("credit_purchase.succeeded".into())
                .with_correlation_id(cmd.command_id.into()),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        bail!("event nacked");
    }
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}
