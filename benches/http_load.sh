#!/usr/bin/env bash
# HTTP load benchmark: the payments demo on loopback, with and without the
# layer, driven by wrk; rounds interleaved so every scenario meets the same
# machine conditions.
#
#   bash benches/http_load.sh            # 3 rounds of 10 s per scenario
#   ROUNDS=5 DURATION=20 bash benches/http_load.sh
#   PG=0 bash benches/http_load.sh       # without the PostgreSQL scenarios
#   SCALE=1 bash benches/http_load.sh    # 1 000 against 1 000 000 stored records
#   ONLY='^(bare|pg)-' bash benches/http_load.sh   # only the scenarios whose names match
#
# Scenarios (all POST /process-payment, --delay-ms 0, 32 connections, 2 threads;
# the server runs with RUST_LOG=off):
#   bare-unique   --no-idempotency, a unique key per request (ignored)
#   first         memory store, a unique key per request
#   bare-fixed    --no-idempotency, one fixed key (ignored)
#   replay        memory store, one fixed key (every request after the first replays)
#   mem-floor-first, mem-floor-replay
#                 the same requests through a hand-written moka guard instead
#                 of the layer (`--hand-written-guard`: a cache bounded by
#                 bytes as the memory store is, one lookup before the work,
#                 one insert of the response after), the floor first and
#                 replay are compared with
#   redis-first   Redis store, a unique key per request
#   redis-replay  Redis store, one fixed key
#   redis-floor-first, redis-floor-replay
#                 the same requests through a hand-written Redis guard instead
#                 of the layer (`--hand-written-guard`: SET NX PX GET before
#                 the work, SET PX of the response after it), the floor the
#                 redis-* scenarios are compared with
#   pg-first      PostgreSQL store, a unique key per request; the demo's
#                 ledger is then the `payments` table, each row written in a
#                 transaction fenced by the store (three committed writes
#                 per charge: claim, ledger row with its fence, completion)
#   pg-unfenced-first
#                 as pg-first, the ledger row written without the fence in a
#                 transaction of its own, as the floor writes it
#                 (`--unfenced-ledger`): the layer against the floor like for
#                 like; pg-first minus it is what the fence costs
#   pg-replay     PostgreSQL store, one fixed key
#   pg-floor-first, pg-floor-replay
#                 the same requests through a hand-written PostgreSQL guard on
#                 the same pool (`--hand-written-guard`: INSERT … ON CONFLICT
#                 DO NOTHING before the work, UPDATE of the response after,
#                 SELECT per replay; the ledger row unfenced), the floor the
#                 pg-* scenarios are compared with
# With SCALE=1 the script instead compares a store holding 1 000 records
# with one holding 1 000 000 (`--prefill`, records of a charge's size; the
# memory store bounded at 2 GiB so none is evicted): per round and size, one
# server (memory, then Redis emptied first) serves first requests, then
# replays:
#   mem-first-1k, mem-replay-1k, mem-first-1M, mem-replay-1M,
#   redis-first-1k, redis-replay-1k, redis-first-1M, redis-replay-1M
# (first requests add records of their own: about as many as it serves.)
# Each bare run sends exactly the requests of the scenarios it is the
# baseline for, so wrk (which shares the two cores) does the same work in
# both. Each scenario and its floor run back to back, the floor first in
# odd rounds and the scenario first in even ones (pg-first, its floor and
# pg-unfenced-first: in that order, then in the reverse one). It prints req/s, p50 and
# p99 per scenario and round, then the
# medians and their ratios to their bare run. For the redis-* scenarios it
# also prints the Redis server's CPU time per request (user + system, from
# `INFO cpu` before and after the run, over wrk's request count), and the
# medians of those; for the pg-* scenarios the CPU of every PostgreSQL
# process on this machine (from /proc, the backends that exited counted
# through their postmaster: run it on an otherwise idle server); for every
# scenario the demo's own CPU per request. Needs wrk (installed with apt-get when missing) and,
# for the Redis scenarios, redis-server (a private one on a free port); for
# the PostgreSQL scenarios, psql and the server at TOWER_IDEMPOTENCY_POSTGRES_URL
# (default postgres://postgres@127.0.0.1:5432/postgres), in a database of
# their own that is dropped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
PORT=${PORT:-3900}
work=$(mktemp -d)
pids=()
pg_admin=${TOWER_IDEMPOTENCY_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_db=tower_idempotency_http_load_$$
have_pg=0
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "$have_pg" = 1 ]; then
        psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if ! command -v wrk >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet --features redis,postgres --example payments
bin=target/release/examples/payments

redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
have_redis=0
if command -v redis-server >/dev/null; then
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
        --maxmemory-policy noeviction >/dev/null 2>&1 &
    pids+=($!)
    have_redis=1
    sleep 0.3
fi

if [ "${PG:-1}" = 1 ] && command -v psql >/dev/null && psql -q "$pg_admin" -c "CREATE DATABASE $pg_db" >/dev/null 2>&1; then
    have_pg=1
    pg_url="${pg_admin%/*}/$pg_db"
fi

cat >"$work/unique.lua" <<'LUA'
local counter = 0
local thread_id = 0
local threads = 0
setup = function(thread)
    threads = threads + 1
    thread:set("tid", threads)
end
init = function(args) thread_id = tid end
request = function()
    counter = counter + 1
    wrk.headers["Idempotency-Key"] = string.format("k-%d-%d-%d", os.time(), thread_id, counter)
    return wrk.format("POST", "/process-payment", nil, '{"amount":100,"currency":"GHS"}')
end
LUA
cat >"$work/fixed.lua" <<'LUA'
request = function()
    wrk.headers["Idempotency-Key"] = "fixed-key"
    return wrk.format("POST", "/process-payment", nil, '{"amount":100,"currency":"GHS"}')
end
LUA

start_server() { # args: extra flags
    # Logging off in the server: the demo logs every charge at info (and the
    # layer every outcome at debug), and writing log lines would be measured
    # instead of the layer.
    RUST_LOG=off "$bin" --addr "127.0.0.1:$PORT" --delay-ms 0 "$@" >"$work/server.log" 2>&1 &
    server=$!
    for _ in $(seq 1200); do # up to a minute: --prefill takes its time
        curl -s "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "server did not start: $(cat "$work/server.log")" >&2
    exit 1
}
stop_server() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }

run() { # name script server-flags...
    local name=$1 script=$2
    shift 2
    if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return 0; fi
    start_server "$@"
    measure "$name" "$script"
    stop_server
}

redis_cpu() { # the Redis server's user + system CPU seconds so far
    redis-cli -p "$redis_port" INFO cpu | tr -d '\r' |
        awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.6f", s}'
}

pg_cpu() { # every PostgreSQL process's user + system CPU seconds so far,
    # with those of the backends that already exited (the postmaster's
    # children's times): the server's CPU, whichever backend spent it
    python3 - <<'PY'
import os
tick = os.sysconf("SC_CLK_TCK")
total = 0
procs = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    if name in ("postgres", "postmaster"):
        procs[pid] = stat[stat.rindex(")") + 2:].split()
for pid, fields in procs.items():
    total += int(fields[11]) + int(fields[12])  # utime, stime
    if fields[1] not in procs:  # a postmaster: with its reaped children
        total += int(fields[13]) + int(fields[14])
print(f"{total / tick:.6f}")
PY
}

process_cpu() { # pid: that process's user + system CPU seconds so far
    [ -r "/proc/$1/stat" ] || { echo "the demo (pid $1) is gone: $(cat "$work/server.log")" >&2; return 1; }
    awk -v tick="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.6f", ($12 + $13) / tick }' "/proc/$1/stat"
}

per_request() { # CPU seconds before, after, requests: µs of CPU per request
    python3 -c "print(f'{($2 - $1) * 1e6 / max(${3:-0}, 1):.1f}')"
}

measure() { # name script: wrk against the running server
    local name=$1 script=$2
    local cpu_before="" pg_before="" demo_before=""
    if [ "$have_redis" = 1 ] && [[ $name == redis* ]]; then cpu_before=$(redis_cpu); fi
    if [ "$have_pg" = 1 ] && [[ $name == pg* ]]; then pg_before=$(pg_cpu); fi
    demo_before=$(process_cpu "$server")
    wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$work/$script" \
        -H 'Content-Type: application/json' --timeout 5s \
        "http://127.0.0.1:$PORT/process-payment" -- >"$work/out" 2>&1 \
        || true
    local rps p50 p99 non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/out")
    p50=$(awk '$1=="50%" {print $2}' "$work/out")
    p99=$(awk '$1=="99%" {print $2}' "$work/out")
    non2xx=$(awk '/Non-2xx/ {print $5}' "$work/out")
    local requests us cpu_note=""
    requests=$(awk '/requests in/ {print $1}' "$work/out")
    if [ -n "$cpu_before" ]; then
        us=$(per_request "$cpu_before" "$(redis_cpu)" "$requests")
        cpu_note="  redis cpu ${us} us/req"
        echo "$name-cpu $us" >>"$work/results"
    fi
    if [ -n "$pg_before" ]; then
        us=$(per_request "$pg_before" "$(pg_cpu)" "$requests")
        cpu_note="$cpu_note  postgres cpu ${us} us/req"
        echo "$name-pgcpu $us" >>"$work/results"
    fi
    us=$(per_request "$demo_before" "$(process_cpu "$server")" "$requests")
    cpu_note="$cpu_note  demo cpu ${us} us/req"
    echo "$name-democpu $us" >>"$work/results"
    printf '%-18s %10s req/s  p50 %8s  p99 %8s  non-2xx %s%s\n' "$name" "$rps" "$p50" "$p99" "${non2xx:-0}" "$cpu_note"
    echo "$name $rps" >>"$work/results"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "wrk: $(wrk -v 2>&1 | head -1)"
echo "rounds=$ROUNDS duration=${DURATION}s connections=$CONNECTIONS"
scale_rounds() {
    for round in $(seq "$ROUNDS"); do
        echo "--- round $round"
        for size in 1k 1M; do
            local n=1000
            [ "$size" = 1M ] && n=1000000
            start_server --prefill "$n" --memory-max-mib 2048
            measure "mem-first-$size" unique.lua
            measure "mem-replay-$size" fixed.lua
            stop_server
            if [ "$have_redis" = 1 ]; then
                redis-cli -p "$redis_port" FLUSHALL >/dev/null
                start_server --store redis --redis-url "redis://127.0.0.1:$redis_port" --prefill "$n"
                measure "redis-first-$size" unique.lua
                measure "redis-replay-$size" fixed.lua
                stop_server
            fi
        done
    done
}

# Each scenario beside its floor: the floor first in odd rounds, ours first
# in even ones, so that neither always runs on the machine the other warmed
# (or the database the other filled).
in_turn() { # round, then `run` argument lists split by `--`: in that
    # order in odd rounds, in the reverse order in even ones
    local round=$1
    shift
    local lists=() current=""
    for arg in "$@"; do
        if [ "$arg" = -- ]; then lists+=("$current"); current=""; else current+="$(printf '%q ' "$arg")"; fi
    done
    lists+=("$current")
    local i n=${#lists[@]}
    for ((i = 0; i < n; i++)); do
        local at=$i
        (( round % 2 )) || at=$((n - 1 - i))
        eval "run ${lists[$at]}"
    done
}

plain_rounds() {
    local redis="redis://127.0.0.1:${redis_port:-0}"
    for round in $(seq "$ROUNDS"); do
        echo "--- round $round"
        run bare-unique unique.lua --no-idempotency
        run bare-fixed fixed.lua --no-idempotency
        in_turn "$round" mem-floor-first unique.lua --hand-written-guard -- first unique.lua
        in_turn "$round" mem-floor-replay fixed.lua --hand-written-guard -- replay fixed.lua
        if [ "$have_redis" = 1 ]; then
            in_turn "$round" redis-floor-first unique.lua --store redis --hand-written-guard --redis-url "$redis" \
                -- redis-first unique.lua --store redis --redis-url "$redis"
            in_turn "$round" redis-floor-replay fixed.lua --store redis --hand-written-guard --redis-url "$redis" \
                -- redis-replay fixed.lua --store redis --redis-url "$redis"
        fi
        if [ "$have_pg" = 1 ]; then
            in_turn "$round" pg-floor-first unique.lua --store postgres --hand-written-guard --postgres-url "$pg_url" \
                -- pg-first unique.lua --store postgres --postgres-url "$pg_url" \
                -- pg-unfenced-first unique.lua --store postgres --unfenced-ledger --postgres-url "$pg_url"
            in_turn "$round" pg-floor-replay fixed.lua --store postgres --hand-written-guard --postgres-url "$pg_url" \
                -- pg-replay fixed.lua --store postgres --postgres-url "$pg_url"
        fi
    done
}

if [ "${SCALE:-0}" = 1 ]; then
    scale_rounds
else
    plain_rounds
fi

echo "--- medians (ratio to the bare run with the same requests)"
python3 - "$work/results" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, rps = line.split()
    runs.setdefault(name, []).append(float(rps))
baseline = {"first": "bare-unique", "redis-first": "bare-unique", "pg-first": "bare-unique",
            "pg-unfenced-first": "bare-unique",
            "replay": "bare-fixed", "redis-replay": "bare-fixed", "pg-replay": "bare-fixed"}
floor = {"redis-first": "redis-floor-first", "redis-replay": "redis-floor-replay",
         "first": "mem-floor-first", "replay": "mem-floor-replay",
         "pg-first": "pg-floor-first", "pg-replay": "pg-floor-replay",
         "pg-unfenced-first": "pg-floor-first"}
for name in list(runs):
    if name.endswith("-1M") and name[:-3] + "-1k" in runs:
        floor[name] = name[:-3] + "-1k"
for name, values in runs.items():
    m = statistics.median(values)
    cpu_of = {"-cpu": "Redis", "-pgcpu": "PostgreSQL", "-democpu": "the demo's"}
    suffix = next((s for s in cpu_of if name.endswith(s)), None)
    if suffix:
        line = f"{name:24s} median {m:6.1f} us of {cpu_of[suffix]} CPU per request  range {min(values):.1f}-{max(values):.1f}"
        scenario = name[: -len(suffix)]
        if scenario in floor and floor[scenario] + suffix in runs:
            line += f"  ratio {m / statistics.median(runs[floor[scenario] + suffix]):.2f} to {floor[scenario] + suffix}"
        print(line)
        continue
    line = f"{name:18s} median {m:10.0f} req/s  range {min(values):.0f}-{max(values):.0f}"
    if name in baseline and baseline[name] in runs:
        line += f"  ratio {m / statistics.median(runs[baseline[name]]):.2f} to {baseline[name]}"
    if name in floor and floor[name] in runs:
        line += f", {m / statistics.median(runs[floor[name]]):.2f} to {floor[name]}"
    print(line)
PY
