#!/usr/bin/env node
// A downstream service's consumer of credit-purchase result events.
//
// It binds a durable queue of its own to the results exchange, so events
// published while it is down wait for it, and it acts on each command's
// outcome once, by the rules of docs/events.md: delivery is at least once (a
// worker that crashes between the broker's confirm and its ack publishes a
// second event for the same command, with a new `event_id`), and a `failed`
// can be corrected later by a `succeeded` (`"reconciled": true` from
// `dead-letters reconcile`, or a replayed dead letter). So it keeps, per
// command, the outcome it acted on: a `succeeded` after a `failed` is handled
// as a correction, anything else already known is a duplicate. It acks each
// event only after handling it and recording the outcome, so a crash
// redelivers rather than loses.
//
// With --from-log it first replays the results log (the stream
// `<exchange>.log`) from the given offset, then takes the live events from
// its queue. The queue is bound before the log is read, so nothing falls
// between the two; what is in both is deduplicated. Where the broker has no
// results log, it says so and consumes its queue only.
//
// "Handling" here prints one line; put your own effect in `handle()`. The
// seen file stands in for your database: record the outcome in the same
// transaction as the effect, and a crash between them cannot handle one twice.
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//     node consume.js --queue billing.credit-purchases --from-log first
'use strict';

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

const EVENT_TYPES = 'credit_purchase.*';

function options() {
  const { values } = parseArgs({
    options: {
      exchange: { type: 'string', default: 'credit-purchase-results' },
      // This service's own durable queue.
      queue: { type: 'string' },
      // File of the outcomes already handled (`<command id> <type>`, one a
      // line; the last line of a command wins).
      seen: { type: 'string', default: 'handled-command-ids.txt' },
      // Replay the results log first: first, last, next, an offset, or an
      // age such as 2h or 7D.
      'from-log': { type: 'string' },
      // Seconds without a log entry after which the log counts as read.
      'log-idle': { type: 'string', default: '1' },
    },
  });
  if (values.queue === undefined) {
    throw new Error(
      'usage: consume.js --queue Q [--exchange X] [--seen FILE] [--from-log OFFSET] [--log-idle SECONDS]',
    );
  }
  return values;
}

const SUCCEEDED = 'credit_purchase.succeeded';
const FAILED = 'credit_purchase.failed';

/** The outcome handled for each command, kept in an append-only file. */
class Seen {
  constructor(path) {
    this.outcomes = new Map();
    if (fs.existsSync(path)) {
      for (const line of fs.readFileSync(path, 'utf8').split('\n')) {
        const space = line.indexOf(' ');
        const key = space < 0 ? line : line.slice(0, space);
        if (key.trim() !== '') this.outcomes.set(key, space < 0 ? '' : line.slice(space + 1));
      }
    }
    this.fd = fs.openSync(path, 'a');
  }

  get(key) {
    return this.outcomes.get(key);
  }

  add(key, kind) {
    fs.writeSync(this.fd, `${key} ${kind}\n`);
    fs.fsyncSync(this.fd);
    this.outcomes.set(key, kind);
  }
}

/**
 * Whether an event of type `kind` is acted on, when the command's outcome
 * already handled is `handled` (undefined: nothing yet). Only a `succeeded`
 * replaces a `failed` (docs/events.md, rule 2); anything else already
 * handled is a duplicate.
 */
function supersedes(handled, kind) {
  return handled === undefined || (handled === FAILED && kind === SUCCEEDED);
}

/**
 * This service's effect of one outcome (here: a line on stdout). `corrects`
 * is the type of the outcome this one replaces, if any: undo what was done
 * for it (e.g. a refund notice sent on the failure).
 */
function handle(event, via, corrects) {
  const code = event.error?.code ?? '-';
  const reconciled = event.reconciled === true ? ' reconciled' : '';
  const correction = corrects === undefined ? '' : ` supersedes=${corrects}`;
  console.log(
    `handled command_id=${event.command_id} type=${event.type} ` +
      `code=${code} event_id=${event.event_id}${reconciled}${correction} via=${via}`,
  );
}

// Synchronous from end to end: Node runs no other callback, a signal's
// included, between the effect, its record and the ack.
function onEvent(seen, channel, message, via) {
  let event;
  try {
    event = JSON.parse(message.content.toString('utf8'));
    if (event === null || typeof event !== 'object' || Array.isArray(event)) {
      throw new Error('not a JSON object');
    }
  } catch (e) {
    // Not an event: dropping it beats redelivering it for ever.
    console.error(`skipped an unreadable message: ${e.message}`);
    channel.reject(message, false);
    return;
  }
  // The results log also holds the worker's `credit_purchase.pending`
  // records (a command still in flight): not results. Taken for one, a
  // record would mark its command seen and hide the result that follows.
  if (!['credit_purchase.succeeded', 'credit_purchase.failed'].includes(event.type)) {
    channel.ack(message);
    return;
  }
  // An invalid command whose id could not be read has a null command_id:
  // its event is then its own key.
  const key = event.command_id ?? `event:${event.event_id}`;
  const handled = seen.get(key);
  if (supersedes(handled, event.type)) {
    handle(event, via, handled);
    seen.add(key, event.type);
  } else {
    console.log(`duplicate command_id=${event.command_id} event_id=${event.event_id} via=${via}`);
  }
  channel.ack(message);
}

/** A passive declare, on a channel of its own: a missing queue closes it. */
async function logExists(connection, name) {
  const probe = await connection.createChannel();
  probe.on('error', () => {});
  try {
    await probe.checkQueue(name);
  } catch (e) {
    if (e.code === 404) return false;
    throw e;
  }
  await probe.close();
  return true;
}

function streamOffset(text) {
  return /^[0-9]+$/.test(text) ? Number(text) : text;
}

async function replayLog(connection, seen, log, offset, idleMs, stopped) {
  const channel = await connection.createChannel();
  // A stream is read with acks and a prefetch: the acks are its credit.
  await channel.prefetch(100);
  let read = 0;
  let timer;
  const caughtUp = new Promise((resolve, reject) => {
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(resolve, idleMs);
    };
    arm();
    channel
      .consume(
        log,
        (message) => {
          if (message === null) return;
          onEvent(seen, channel, message, 'log');
          read += 1;
          arm();
        },
        { noAck: false, arguments: { 'x-stream-offset': streamOffset(offset) } },
      )
      .catch(reject);
  });
  await Promise.race([caughtUp, stopped]);
  clearTimeout(timer);
  await channel.close();
  console.log(`read ${read} entries of the results log`);
}

async function main() {
  const args = options();
  const seen = new Seen(args.seen);
  const url = process.env.AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/%2f';
  const connection = await amqp.connect(url);
  const channel = await connection.createChannel();
  await channel.assertQueue(args.queue, { durable: true, arguments: { 'x-queue-type': 'quorum' } });
  await channel.bindQueue(args.queue, args.exchange, EVENT_TYPES);

  let stopping = false;
  const stopped = new Promise((resolve) => {
    const stop = () => {
      stopping = true;
      resolve();
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  });

  if (args['from-log'] !== undefined) {
    const log = `${args.exchange}.log`;
    if (await logExists(connection, log)) {
      console.log(`replaying the results log ${log} from ${args['from-log']}`);
      await replayLog(connection, seen, log, args['from-log'], Number(args['log-idle']) * 1000, stopped);
    } else {
      console.log(`no results log ${log} on this broker: consuming ${args.queue} only`);
    }
  }
  if (!stopping) {
    await channel.prefetch(10);
    const { consumerTag } = await channel.consume(args.queue, (message) => {
      if (message === null) {
        console.error(`the broker cancelled the consumer of ${args.queue}`);
        process.exit(1);
      }
      onEvent(seen, channel, message, 'queue');
    });
    console.log(`consuming ${args.queue}`);
    await stopped;
    await channel.cancel(consumerTag);
  }
  await connection.close();
}

main().catch((e) => {
  console.error(e.message);
  process.exitCode = 1;
});
