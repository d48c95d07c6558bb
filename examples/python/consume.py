#!/usr/bin/env python3
"""A downstream service's consumer of credit-purchase result events.

It binds a durable queue of its own to the results exchange, so events
published while it is down wait for it, and it acts on each command's
outcome once, by the rules of docs/events.md: delivery is at least once (a
worker that crashes between the broker's confirm and its ack publishes a
second event for the same command, with a new `event_id`), and a `failed`
can be corrected later by a `succeeded` (`"reconciled": true` from
`dead-letters reconcile`, or a replayed dead letter). So it keeps, per
command, the outcome it acted on: a `succeeded` after a `failed` is handled
as a correction, anything else already known is a duplicate. It acks each
event only after handling it and recording the outcome, so a crash
redelivers rather than loses.

With --from-log it first replays the results log (the stream
`<exchange>.log`) from the given offset, then takes the live events from its
queue. The queue is bound before the log is read, so nothing falls between
the two; what is in both is deduplicated. Where the broker has no results log,
it says so and consumes its queue only.

"Handling" here prints one line; put your own effect in `handle()`. The seen
file stands in for your database: record the outcome in the same transaction
as the effect, and a crash between them cannot handle one twice.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
      python3 consume.py --queue billing.credit-purchases --from-log first
"""

import argparse
import json
import os
import signal
import sys

import pika
import pika.exceptions

EVENT_TYPES = "credit_purchase.*"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exchange", default="credit-purchase-results", help="the results exchange")
    p.add_argument("--queue", required=True, help="this service's own durable queue")
    p.add_argument(
        "--seen",
        default="handled-command-ids.txt",
        help="file of the outcomes already handled (`<command id> <type>`, one a line; the last line of a command wins)",
    )
    p.add_argument(
        "--from-log",
        default=None,
        metavar="OFFSET",
        help="replay the results log first: first, last, next, an offset, or an age such as 2h or 7D",
    )
    p.add_argument(
        "--log-idle",
        type=float,
        default=1.0,
        help="seconds without a log entry after which the log counts as read",
    )
    return p.parse_args()


SUCCEEDED = "credit_purchase.succeeded"
FAILED = "credit_purchase.failed"


class Seen:
    """The outcome handled for each command, kept in an append-only file."""

    def __init__(self, path):
        self.outcomes = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    key, _, kind = line.rstrip("\n").partition(" ")
                    if key:
                        self.outcomes[key] = kind
        self.file = open(path, "a", encoding="utf-8")

    def get(self, key):
        return self.outcomes.get(key)

    def add(self, key, kind):
        self.file.write(f"{key} {kind}\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.outcomes[key] = kind


def supersedes(handled, kind):
    """Whether an event of type `kind` is acted on, when the command's
    outcome already handled is `handled` (None: nothing yet). Only a
    `succeeded` replaces a `failed` (docs/events.md, rule 2); anything else
    already handled is a duplicate."""
    return handled is None or (handled == FAILED and kind == SUCCEEDED)


def handle(event, via, corrects):
    """This service's effect of one outcome (here: a line on stdout).
    `corrects` is the type of the outcome this one replaces, if any: undo
    what was done for it (e.g. a refund notice sent on the failure)."""
    code = (event.get("error") or {}).get("code") or "-"
    correction = f" supersedes={corrects}" if corrects else ""
    reconciled = " reconciled" if event.get("reconciled") is True else ""
    print(
        f"handled command_id={event.get('command_id')} type={event.get('type')} "
        f"code={code} event_id={event.get('event_id')}{reconciled}{correction} via={via}",
        flush=True,
    )


def on_event(seen, channel, method, body, via):
    try:
        event = json.loads(body)
        if not isinstance(event, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        # Not an event: dropping it beats redelivering it for ever.
        print(f"skipped an unreadable message: {e}", file=sys.stderr, flush=True)
        channel.basic_reject(method.delivery_tag, requeue=False)
        return
    # The results log also holds the worker's `credit_purchase.pending`
    # records (a command still in flight): not results. Taken for one, a
    # record would mark its command seen and hide the result that follows.
    if event.get("type") not in ("credit_purchase.succeeded", "credit_purchase.failed"):
        channel.basic_ack(method.delivery_tag)
        return
    # An invalid command whose id could not be read has a null command_id:
    # its event is then its own key.
    key = event.get("command_id") or f"event:{event.get('event_id')}"
    kind = event.get("type")
    handled = seen.get(key)
    if supersedes(handled, kind):
        handle(event, via, handled)
        seen.add(key, kind)
    else:
        print(
            f"duplicate command_id={event.get('command_id')} "
            f"event_id={event.get('event_id')} via={via}",
            flush=True,
        )
    channel.basic_ack(method.delivery_tag)


def log_exists(connection, name):
    """A passive declare, on a channel of its own: a missing queue closes it."""
    probe = connection.channel()
    try:
        probe.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return False
        raise
    probe.close()
    return True


def stream_offset(text):
    return int(text) if text.isdigit() else text


def replay_log(connection, seen, log, offset, idle, stopping):
    channel = connection.channel()
    # A stream is read with acks and a prefetch: the acks are its credit.
    channel.basic_qos(prefetch_count=100)
    read = 0
    for method, _properties, body in channel.consume(
        log, arguments={"x-stream-offset": stream_offset(offset)}, inactivity_timeout=idle
    ):
        if method is None:
            break
        on_event(seen, channel, method, body, "log")
        read += 1
        if stopping:
            break
    channel.cancel()
    channel.close()
    print(f"read {read} entries of the results log", flush=True)


def main():
    args = parse_args()
    seen = Seen(args.seen)
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(args.queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(args.queue, args.exchange, routing_key=EVENT_TYPES)

    # Stop between two events, never inside one: the handler finishes its
    # event (effect, record, ack) before the loop returns.
    stopping = []

    def stop(_signum, _frame):
        stopping.append(True)
        connection.add_callback_threadsafe(channel.stop_consuming)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.from_log is not None:
        log = f"{args.exchange}.log"
        if log_exists(connection, log):
            print(f"replaying the results log {log} from {args.from_log}", flush=True)
            replay_log(connection, seen, log, args.from_log, args.log_idle, stopping)
        else:
            print(f"no results log {log} on this broker: consuming {args.queue} only", flush=True)
    if stopping:
        connection.close()
        return 0

    channel.basic_qos(prefetch_count=10)
    channel.basic_consume(
        args.queue, lambda ch, method, _props, body: on_event(seen, ch, method, body, "queue")
    )
    print(f"consuming {args.queue}", flush=True)
    channel.start_consuming()
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
