#!/usr/bin/env python3
"""Sends one credit-purchase command and waits for its result event.

The command goes out with publisher confirms (so a command the broker did not
take is reported, never assumed sent) and with `reply_to` naming a private
queue: the worker publishes a copy of the result event there. The event on the
results exchange remains the record; the copy only spares this requester a
subscription of its own.

Exit status: 0 succeeded, 1 failed, 2 no event within --timeout,
3 the broker did not take the command (or could not be reached), 64 a usage
error.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
      python3 publish.py --customer cus_Typ0px2W0aiEtl \
        --product itm_3kXODDF42QXtnL --credits 32 --amount 24000
"""

import argparse
import json
import os
import sys
import time
import uuid

import pika
import pika.exceptions

SUCCEEDED, FAILED, TIMED_OUT, NOT_SENT = 0, 1, 2, 3


class Parser(argparse.ArgumentParser):
    """argparse, exiting 64 on a usage error rather than its own 2, which
    means a timeout here."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(64, f"{self.prog}: error: {message}\n")


def parse_args():
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", default="credit-purchases", help="the commands queue")
    p.add_argument(
        "--command-id",
        default=None,
        help="the Idempotency-Key: reuse it to retry the same purchase (default: a new UUID)",
    )
    p.add_argument("--customer", required=True)
    p.add_argument("--product", required=True)
    p.add_argument("--credits", type=int, required=True)
    price = p.add_mutually_exclusive_group(required=True)
    price.add_argument("--amount", type=int, help="amount excluding tax, in cents")
    price.add_argument("--price-id")
    p.add_argument("--expires-at", default=None, help="RFC 3339 date-time")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the event")
    return p.parse_args()


def main():
    args = parse_args()
    command_id = args.command_id or str(uuid.uuid4())
    command = {
        "command_id": command_id,
        "customer_id": args.customer,
        "product_id": args.product,
        "credit_count": args.credits,
        "amount_excluding_tax": args.amount,
        "price_id": args.price_id,
        "expires_at": args.expires_at,
    }
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as e:
        print(f"cannot reach the broker: {e!r}", file=sys.stderr)
        return NOT_SENT
    try:
        return request(connection, args, command)
    finally:
        if connection.is_open:
            connection.close()


def request(connection, args, command):
    channel = connection.channel()
    channel.confirm_delivery()
    # Server-named, exclusive, auto-deleted: it lives as long as this
    # connection, so an abandoned request leaves nothing behind. It exists
    # before the command is sent, so the reply cannot arrive too early.
    reply_queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=command["command_id"],
        reply_to=reply_queue,
    )
    try:
        # mandatory: a command no queue takes (a typo in --queue) comes back
        # as unroutable instead of being dropped while we wait for nothing.
        channel.basic_publish(
            "", args.queue, json.dumps(command), properties=properties, mandatory=True
        )
    except pika.exceptions.UnroutableError:
        print(f"no queue {args.queue!r} took the command", file=sys.stderr)
        return NOT_SENT
    except pika.exceptions.NackError:
        print("the broker refused the command (nack)", file=sys.stderr)
        return NOT_SENT
    print(f"sent {command['command_id']}, waiting for its event", file=sys.stderr)

    replies = []

    def on_reply(_channel, _method, _properties, body):
        try:
            event = json.loads(body)
        except ValueError:
            return
        if isinstance(event, dict) and event.get("command_id") == command["command_id"]:
            replies.append(event)

    channel.basic_consume(reply_queue, on_reply, auto_ack=True)
    deadline = time.monotonic() + args.timeout
    while not replies and time.monotonic() < deadline:
        connection.process_data_events(time_limit=max(0.0, deadline - time.monotonic()))
    if replies:
        event = replies[0]
        print(json.dumps(event))
        return SUCCEEDED if event.get("type") == "credit_purchase.succeeded" else FAILED
    print(f"no event for {command['command_id']} within {args.timeout} s", file=sys.stderr)
    return TIMED_OUT


if __name__ == "__main__":
    sys.exit(main())
