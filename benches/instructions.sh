#!/usr/bin/env bash
# Instructions per command, counted by callgrind: the worker (or, with
# --baseline, the bench's baseline loop) against the local broker and the
# simulator, over N and then 2N commands; the difference divided by N is the
# cost of one command without the start-up. Unlike seconds, the count does not
# move with what else the machine is doing, so it shows a change of a few
# percent that the timed bench cannot (BENCHMARKS.md, "Instructions").
#
#   cargo build --release && cargo bench --bench pipeline --no-run
#   pip install pika
#   benches/instructions.sh [--baseline] [N] [VAR=value ...]
#
# VAR=value pairs are set for the worker, e.g. RUST_LOG=warn,lapin=off.
# The baseline's results exchange is bound to a stream like the worker's
# results log (its default topology), so both publish into the same kind of
# topology. CPW_WORKER names another worker binary (an older build to
# compare with); CALLGRIND_KEEP=DIR keeps both runs' callgrind.out files
# there, for callgrind_annotate --inclusive=yes. INSTRUCTIONS_SIM_PORT and
# INSTRUCTIONS_OPS_PORT (default 18089 and 19090) move the simulator and the
# worker's operations port, so that two counts can run at once.
# Needs valgrind, rabbitmqctl and the broker at 127.0.0.1:5672 (guest).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
worker="${CPW_WORKER:-$root/target/release/credit-purchase-worker}"
subject=worker
if [[ ${1:-} == --baseline ]]; then
    subject=baseline
    shift
fi
n=${1:-3000}
shift || true
work=$(mktemp -d)
# Ports of its own, settable so that two runs can share a machine.
sim_port=${INSTRUCTIONS_SIM_PORT:-18089}
ops_port=${INSTRUCTIONS_OPS_PORT:-19090}

cleanup() {
    [[ -n ${sim:-} ]] && kill "$sim" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$worker" simulator --listen "127.0.0.1:$sim_port" --rate-limit 0 >"$work/sim.log" 2>&1 &
sim=$!

# Publishes $2 commands to queue $1, then waits for as many events on an
# observer queue bound to the results exchange; deletes what it made.
publish_and_wait() {
    python3 - "$1" "$2" <<'PY'
import json, sys, time, uuid
import pika

queue, n = sys.argv[1], int(sys.argv[2])
connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
channel = connection.channel()
channel.confirm_delivery()
observer = queue + "-observer"
channel.queue_declare(observer, auto_delete=True)
channel.queue_bind(observer, queue + "-results", "#")
for _ in range(n):
    body = json.dumps({
        "command_id": str(uuid.uuid4()),
        "customer_id": "cus_Typ0px2W0aiEtl",
        "product_id": "itm_3kXODDF42QXtnL",
        "credit_count": 32,
        "amount_excluding_tax": 24000,
    })
    channel.basic_publish("", queue, body, pika.BasicProperties(
        content_type="application/json", delivery_mode=2))
seen, deadline = 0, time.time() + 900
for method, _, _ in channel.consume(observer, auto_ack=True, inactivity_timeout=5):
    seen += method is not None
    if seen >= n or time.time() > deadline:
        break
if seen < n:
    sys.exit(f"only {seen} of {n} events arrived")
PY
}

delete_topology() {
    python3 - "$1" <<'PY'
import sys
import pika

queue = sys.argv[1]
connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
for name in [queue, queue + ".dead", queue + "-results.log"] + [f"{queue}.retry.{s}s" for s in (30, 300, 1800, 7200)]:
    channel = connection.channel()
    try:
        channel.queue_delete(name)
    except Exception:
        pass
for name in [queue + "-results", queue + ".dlx", queue]:
    channel = connection.channel()
    try:
        channel.exchange_delete(name)
    except Exception:
        pass
PY
}

declare_for_baseline() {
    python3 - "$1" <<'PY'
import sys
import pika

queue = sys.argv[1]
connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
channel = connection.channel()
channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
channel.exchange_declare(queue + "-results", "topic", durable=True)
channel.queue_declare(queue + "-results.log", durable=True, arguments={
    "x-queue-type": "stream", "x-max-age": "7D"})
channel.queue_bind(queue + "-results.log", queue + "-results", "#")
PY
}

# Prints the instructions of one run over $1 commands.
run() {
    local commands=$1 queue="cpw-instructions-$RANDOM$RANDOM" out="$work/callgrind.out"
    shift
    rm -f "$out"
    if [[ $subject == baseline ]]; then
        declare_for_baseline "$queue"
        local bench
        bench=$(ls -t "$root"/target/release/deps/pipeline-* | grep -v '\.d$' | head -1)
        env BASELINE_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f" \
            BASELINE_QUEUE="$queue" BASELINE_RESULTS="$queue-results" \
            BASELINE_SIM="http://127.0.0.1:$sim_port" BASELINE_PREFETCH=64 \
            valgrind --tool=callgrind --callgrind-out-file="$out" \
            "$bench" --baseline-child >"$work/subject.log" 2>&1 &
    else
        env "$@" CPW__AMQP__QUEUE="$queue" CPW__AMQP__RESULTS_EXCHANGE="$queue-results" \
            CPW__AMQP__PREFETCH=64 CPW__HYPERLINE__BASE_URL="http://127.0.0.1:$sim_port" \
            CPW__HYPERLINE__API_KEY=sim_test_key CPW__SERVER__LISTEN=127.0.0.1:$ops_port \
            valgrind --tool=callgrind --callgrind-out-file="$out" \
            "$worker" run >"$work/subject.log" 2>&1 &
    fi
    local pid=$!
    for _ in $(seq 1 120); do
        rabbitmqctl -q list_queues name 2>/dev/null | grep -qx "$queue" && break
        sleep 1
    done
    sleep 2
    publish_and_wait "$queue" "$commands"
    kill -TERM "$pid"
    wait "$pid" || true
    delete_topology "$queue"
    if [[ -n ${CALLGRIND_KEEP:-} ]]; then
        mkdir -p "$CALLGRIND_KEEP"
        cp "$out" "$CALLGRIND_KEEP/callgrind.$subject.$commands.out"
    fi
    grep -h '^totals:' "$out" | awk '{print $2}'
}

shift_args=("$@")
one=$(run "$n" "${shift_args[@]}")
two=$(run $((2 * n)) "${shift_args[@]}")
echo "$subject: $(((two - one) / n)) instructions per command ($one for $n, $two for $((2 * n)))"
