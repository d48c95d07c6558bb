#!/usr/bin/env node
// Sends one credit-purchase command and waits for its result event.
//
// The command goes out with publisher confirms (so a command the broker did
// not take is reported, never assumed sent) and with `replyTo` naming a
// private queue: the worker publishes a copy of the result event there. The
// event on the results exchange remains the record; the copy only spares this
// requester a subscription of its own.
//
// Exit status: 0 succeeded, 1 failed, 2 no event within --timeout,
// 3 the broker did not take the command (or could not be reached), 64 a
// usage error.
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//     node publish.js --customer cus_Typ0px2W0aiEtl \
//       --product itm_3kXODDF42QXtnL --credits 32 --amount 24000
'use strict';

const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

const SUCCEEDED = 0;
const FAILED = 1;
const TIMED_OUT = 2;
const NOT_SENT = 3;
const USAGE = 64;

class UsageError extends Error {}

function options() {
  const { values } = parseArgs({
    options: {
      queue: { type: 'string', default: 'credit-purchases' },
      // The Idempotency-Key: reuse it to retry the same purchase.
      'command-id': { type: 'string' },
      customer: { type: 'string' },
      product: { type: 'string' },
      credits: { type: 'string' },
      // Exactly one of the two.
      amount: { type: 'string' },
      'price-id': { type: 'string' },
      'expires-at': { type: 'string' },
      timeout: { type: 'string', default: '30' },
    },
  });
  const missing = ['customer', 'product', 'credits'].filter((k) => values[k] === undefined);
  if (missing.length > 0 || (values.amount === undefined) === (values['price-id'] === undefined)) {
    throw new UsageError(
      'usage: publish.js --customer ID --product ID --credits N (--amount CENTS | --price-id ID) ' +
        '[--queue Q] [--command-id ID] [--expires-at RFC3339] [--timeout SECONDS]',
    );
  }
  return values;
}

async function request(connection, args, command) {
  const channel = await connection.createConfirmChannel();
  // Server-named, exclusive, auto-deleted: it lives as long as this
  // connection, so an abandoned request leaves nothing behind. It exists
  // before the command is sent, so the reply cannot arrive too early.
  const { queue: replyQueue } = await channel.assertQueue('', { exclusive: true, autoDelete: true });
  const timeoutMs = Number(args.timeout) * 1000;
  let timer;
  const reply = new Promise((resolve) => {
    timer = setTimeout(() => resolve(null), timeoutMs);
    channel.consume(
      replyQueue,
      (message) => {
        let event;
        try {
          event = JSON.parse(message.content.toString('utf8'));
        } catch {
          return;
        }
        if (event !== null && typeof event === 'object' && event.command_id === command.command_id) {
          resolve(event);
        }
      },
      { noAck: true },
    );
  });

  // mandatory: a command no queue takes (a typo in --queue) comes back as
  // returned instead of being dropped while we wait for nothing. The broker
  // sends the return before the confirm, so it is known once the confirm is.
  let returned = false;
  channel.on('return', () => {
    returned = true;
  });
  channel.sendToQueue(args.queue, Buffer.from(JSON.stringify(command)), {
    contentType: 'application/json',
    persistent: true,
    messageId: command.command_id,
    replyTo: replyQueue,
    mandatory: true,
  });
  try {
    await channel.waitForConfirms();
  } catch {
    clearTimeout(timer);
    console.error('the broker refused the command (nack)');
    return NOT_SENT;
  }
  if (returned) {
    clearTimeout(timer);
    console.error(`no queue '${args.queue}' took the command`);
    return NOT_SENT;
  }
  console.error(`sent ${command.command_id}, waiting for its event`);

  const event = await reply;
  clearTimeout(timer);
  if (event === null) {
    console.error(`no event for ${command.command_id} within ${args.timeout} s`);
    return TIMED_OUT;
  }
  console.log(JSON.stringify(event));
  return event.type === 'credit_purchase.succeeded' ? SUCCEEDED : FAILED;
}

async function main() {
  const args = options();
  const command = {
    command_id: args['command-id'] ?? randomUUID(),
    customer_id: args.customer,
    product_id: args.product,
    credit_count: Number(args.credits),
    amount_excluding_tax: args.amount === undefined ? null : Number(args.amount),
    price_id: args['price-id'] ?? null,
    expires_at: args['expires-at'] ?? null,
  };
  const url = process.env.AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/%2f';
  let connection;
  try {
    connection = await amqp.connect(url);
  } catch (e) {
    console.error(`cannot reach the broker: ${e.message}`);
    return NOT_SENT;
  }
  try {
    return await request(connection, args, command);
  } finally {
    await connection.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    console.error(e.message);
    process.exitCode = e instanceof UsageError ? USAGE : NOT_SENT;
  },
);
