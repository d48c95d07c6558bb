"""pika for testkit/src/pika.rs: publishes and takes messages whose
short-string properties and header names are bytes, as pika sends them
(lapin's are text).

argv[1] is a JSON object: "url"; "publish", a list of messages to publish to
a queue with a confirm each ({"queue", "body", "properties": {pika's name:
bytes}, "headers": [[name, value]]}); "take", a queue to empty, or null.
Bytes are lists of integers. Prints each message taken as one such JSON
object a line (headers whose value is not a string left out).
"""

import json
import sys

import pika

SHORT_STRINGS = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


def octets(value):
    return list(value.encode("utf-8") if isinstance(value, str) else value)


def publish(channel, message):
    properties = {name: bytes(v) for name, v in message["properties"].items()}
    headers = {bytes(k): bytes(v) for k, v in message["headers"]}
    channel.basic_publish(
        exchange="",
        routing_key=message["queue"],
        body=bytes(message["body"]),
        properties=pika.BasicProperties(
            delivery_mode=2, headers=headers or None, **properties
        ),
        mandatory=True,
    )


def taken(body, properties):
    return {
        "body": list(body),
        "properties": {
            name: octets(getattr(properties, name))
            for name in SHORT_STRINGS
            if getattr(properties, name) is not None
        },
        "headers": [
            [octets(k), octets(v)]
            for k, v in (properties.headers or {}).items()
            if isinstance(v, (str, bytes))
        ],
    }


def main():
    spec = json.loads(sys.argv[1])
    connection = pika.BlockingConnection(pika.URLParameters(spec["url"]))
    channel = connection.channel()
    channel.confirm_delivery()
    for message in spec["publish"]:
        publish(channel, message)
    while spec["take"]:
        method, properties, body = channel.basic_get(spec["take"], auto_ack=True)
        if method is None:
            break
        print(json.dumps(taken(body, properties)), flush=True)
    connection.close()


if __name__ == "__main__":
    main()
