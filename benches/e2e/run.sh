#!/usr/bin/env bash
# End-to-end load benchmarks of token-broker on loopback. Not a test: nothing here fails on a
# timing; it fails only when a server cannot be started or answers wrongly.
#
#   benches/e2e/run.sh hits     `make bench-e2e`: cache hits through POST /v1/tokens against
#                               the floor (a bare hyper server answering the same bytes, see
#                               examples/floor.rs) and nginx as a caching proxy of the same POST,
#                               then start-up time and binary size.
#   benches/e2e/run.sh startup  start-up time and binary size alone (also the end of `hits`).
#   benches/e2e/run.sh misses   `make bench-misses`: what the broker adds to the upstream's
#                               latency on misses, and 100,000 distinct misses with the broker's
#                               memory bounded by its cache.
#
# Every server runs on 127.0.0.1 only, one at a time under load, with the same wrk
# (-t2 -c64 --latency, benches/e2e/requests.lua). nginx logs each request as the broker does
# (buffered, see nginx.conf.in); the `nginx-nolog` row is the same nginx on a port that logs
# nothing. Rounds are interleaved (floor, broker, nginx, nginx-nolog,
# then again) so that noise from a shared machine falls on every row alike; compare only ratios
# taken in one run. Every process started here is stopped on exit, Ctrl-C included. The master
# key and the caller secret are random per run, kept in a private temporary directory, and
# never printed.
#
# Results, the machine they were measured on and the method: docs/performance.md.
#
# Knobs (environment): BENCH_DURATION seconds per measured run (10), BENCH_ROUNDS (3),
# BENCH_CONNECTIONS (64), BENCH_KEYS distinct cached keys (10000), BENCH_NO_BUILD=1 to skip the
# release build, BENCH_EXTRA="NAME=PATH ..." other token-broker binaries (older builds, say)
# measured in the same rounds, one extra row each. BENCH_REDIS=0 leaves out the row of hits
# served from Redis (`broker-redis`: a broker with [cache.shared] and a one-entry local cache,
# so its hits come from Redis; it runs when redis-server is installed). BENCH_FLOOR_WORK="NS ..."
# ("500 1000 2000") adds a `floor+NSns` row per value: the floor spinning NS nanoseconds on each request,
# which shows what that much CPU added to a request costs in requests/s on this machine; "" for
# none. BENCH_WRK_BATCH=1 runs wrk as SCHED_BATCH (`chrt -b 0`): its threads, woken by an
# answer, then no longer preempt the server on the shared cores (not the issue's method; it
# shows how much of a ratio the preemptions make).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=benches/e2e
mode=${1:-hits}
duration=${BENCH_DURATION:-10}
rounds=${BENCH_ROUNDS:-3}
conns=${BENCH_CONNECTIONS:-64}
keys=${BENCH_KEYS:-10000}

for tool in wrk curl; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install -y wrk curl nginx)" >&2; exit 2; }
done
if [[ $mode == hits ]] && ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
    echo "bench: nginx is missing (apt-get install -y nginx)" >&2
    exit 2
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

work=$(mktemp -d /tmp/token-broker-bench.XXXXXX)
chmod 711 "$work"   # nginx's workers must reach their cache directory, nothing else
# The files the broker reads its keys from live in a directory of their own, as a mounted
# Secret does: the broker watches their directory (server.watch_files), and the logs written
# next to them would wake its watcher on every batch.
mkdir -m 700 "$work/keys"
pids=()

# Drops PID (exactly) from the processes to stop on exit.
forget_pid() {
    local kept=() p
    for p in "${pids[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done
    pids=("${kept[@]}")
}

stop_all() {
    local pid live=("${pids[@]}")
    for pid in "${live[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${live[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${live[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    pids=()
}
cleanup() {
    stop_all
    rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

die() {
    echo "bench: $*" >&2
    exit 1
}

# Waits (at most 10 s) for FILE to exist and be non-empty.
wait_file() {
    for _ in $(seq 200); do
        [[ -s $1 ]] && return 0
        sleep 0.05
    done
    die "timed out waiting for $1"
}

# A loopback port nothing listens on, below the ephemeral range, so no outgoing connection holds it.
free_port() {
    local p low
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range
    for _ in $(seq 100); do
        p=$((10000 + RANDOM % (low - 10000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    die "no free port"
}

# What PID and its children that are still running (nginx's workers) have used so far, as
# "user system preempted": CPU ticks in user and system mode, and involuntary context switches
# of all their threads (how often the kernel took a core from the server for another task: wrk,
# on these cores).
usage() {
    local user=0 system=0 preempted=0 pid task u s
    for pid in "$1" $(pgrep -P "$1" || true); do
        [[ -r /proc/$pid/stat ]] || continue
        # utime and stime are fields 14 and 15; the command name (field 2) holds no spaces here.
        read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat")
        user=$((user + u)) system=$((system + s))
        for task in /proc/"$pid"/task/*/status; do
            [[ -r $task ]] && preempted=$((preempted + $(awk '/^nonvoluntary_ctxt_switches:/ {print $2}' "$task" || echo 0)))
        done
    done
    echo "$user $system $preempted"
}

rss_kib() {
    awk '/^VmRSS:/ {print $2}' "/proc/$1/status"
}

# wrk output -> "requests req/s p50_ms p99_ms errors"
parse_wrk() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
            return v
        }
        /^ +50%/ { p50 = ms($2) }
        /^ +99%/ { p99 = ms($2) }
        / requests in / { n = $1 }
        /^Requests\/sec:/ { rps = $2 }
        /Non-2xx or 3xx responses:/ { errors += $NF }
        /Socket errors:/ { for (i = 3; i <= NF; i += 2) errors += $(i + 1) + 0 }
        END { printf "%d %.0f %.3f %.3f %d\n", n, rps, p50, p99, errors }
    ' "$1"
}

# run_wrk NAME URL THREADS CONNECTIONS SECONDS [VAR=VALUE...]: writes $work/NAME.wrk
run_wrk() {
    local name=$1 url=$2 threads=$3 connections=$4 seconds=$5
    shift 5
    # In the background and waited for, so that a signal to this script is handled at once.
    local batch=()
    [[ ${BENCH_WRK_BATCH:-0} != 1 ]] || batch=(chrt -b 0)
    env "$@" timeout $((seconds + 30)) "${batch[@]}" wrk -t"$threads" -c"$connections" -d"${seconds}s" \
        --timeout 5s -s "$here/requests.lua" --latency "$url" >"$work/$name.wrk" 2>&1 &
    local wrk_pid=$!
    pids+=("$wrk_pid")
    local status=0
    wait "$wrk_pid" || status=$?
    forget_pid "$wrk_pid"
    ((status == 0)) || die "wrk failed against $url: $(tail -3 "$work/$name.wrk")"
}

build() {
    if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
        echo "== building release (cargo build --release: binary, floor, fake Truora)"
        cargo build --locked --release --bin token-broker --example floor --example fake_truora
    fi
    BROKER=target/release/token-broker
    [[ -x $BROKER && -x target/release/examples/floor && -x target/release/examples/fake_truora ]] ||
        die "release binaries missing; run without BENCH_NO_BUILD"
}

secrets() {
    (umask 077
     head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/keys/master.key"
     head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/secret")
    SECRET_DIGEST=$("$BROKER" hash-secret <"$work/secret")
    # curl reads the header from this file, so the secret is not in any process's arguments.
    (umask 077; printf 'Authorization: Bearer %s\n' "$(cat "$work/secret")" >"$work/auth.header")
}

start_fake() {
    target/release/examples/fake_truora "$work/keys/master.key" "$work/fake.addr" 2>"$work/fake.log" &
    pids+=($!)
    FAKE_PID=$!
    wait_file "$work/fake.addr"
    FAKE_URL=$(sed -n 1p "$work/fake.addr")
    FAKE_CONTROL=$(sed -n 2p "$work/fake.addr")
}

fake_calls() {
    curl -sf --max-time 5 "http://$FAKE_CONTROL/" || die "fake Truora control port did not answer"
}

# start_broker MAX_ENTRIES [LISTEN ADMIN_LISTEN [BINARY]]: sets BROKER_PID, BROKER_URL, BROKER_ADMIN
# write_broker_config MAX_ENTRIES LISTEN ADMIN_LISTEN: $work/broker.toml for the fake Truora
write_broker_config() {
    cat >"$work/broker.toml" <<TOML
[server]
listen = "$2"
admin_listen = "$3"
shutdown_timeout = "1s"
[upstream]
account_url = "$FAKE_URL"
web_url = "https://identity.truora.com"
api_key_file = "$work/keys/master.key"
timeout = "5s"
# The benchmark fills caches of 10,000 and misses 100,000 times as fast as it can: the real
# budget (50 mints a second) would throttle it.
mint_rate = 100000
[cache]
max_entries = $1
${SHARED_TOML:-}
[[clients]]
id = "bench"
token_sha256 = "$SECRET_DIGEST"
TOML
}

start_broker() {
    local max_entries=$1 listen=${2:-127.0.0.1:0} admin=${3:-127.0.0.1:0} binary=${4:-$BROKER}
    write_broker_config "$max_entries" "$listen" "$admin"
    broker_count=$((${broker_count:-0} + 1))
    local log=$work/broker-$broker_count.log
    "$binary" serve --config "$work/broker.toml" 2>"$log" &
    pids+=($!)
    BROKER_PID=$!
    for _ in $(seq 200); do
        grep -qs ' ready' "$log" && break
        kill -0 "$BROKER_PID" 2>/dev/null || die "broker exited: $(tail -3 "$log")"
        sleep 0.05
    done
    BROKER_URL=http://$(grep -o ' listen=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
    BROKER_ADMIN=http://$(grep -o 'admin_listen=[0-9.:]*' "$log" | head -1 | cut -d= -f2)
    [[ $BROKER_URL != http:// ]] || die "broker did not log its address"
}

metric() {
    curl -sf --max-time 5 "$BROKER_ADMIN/metrics" | awk -v m="$1" '$1 == m {print $2}'
}

# One request as wrk sends it (user 1); prints the body to FILE, checks the status.
probe() {
    local url=$1 out=$2
    shift 2
    local code
    code=$(curl -s --max-time 5 -o "$out" -w '%{http_code}' -X POST "$url" \
        -H 'Content-Type: application/x-www-form-urlencoded' "$@" \
        --data-binary 'key_type=web&grant=digital-identity&country=CO&flow_id=IPF0a1b2c3d4e5f&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id=user-1')
    [[ $code == 200 ]] || die "$url answered $code"
}

stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

# Primes a server's cache: users 1..keys in turn until the fake saw `keys` new calls (<= 60 s).
prime() {
    local name=$1 url=$2 before=$3
    for _ in $(seq 12); do
        run_wrk "prime-$name" "$url" 1 16 5 BENCH_SECRET_FILE="$work/secret" BENCH_ORDER=cycle BENCH_KEYS="$keys"
        (($(fake_calls) - before >= keys)) && return 0
    done
    die "$name: the cache did not fill with $keys keys in 60 s"
}

hits() {
    build
    secrets
    start_fake
    local calls0
    calls0=$(fake_calls)

    start_broker 100000
    prime broker "$BROKER_URL/v1/tokens" "$calls0"
    local after_prime
    after_prime=$(fake_calls)
    probe "$BROKER_URL/v1/tokens" "$work/answer.json" -H @"$work/auth.header"
    [[ $(metric token_broker_cache_entries) == "$keys" ]] || die "broker holds $(metric token_broker_cache_entries) entries, expected $keys"

    # The floor, then the floor with each BENCH_FLOOR_WORK added to every request.
    local ns floor_names=() floor_urls=() floor_pids=()
    for ns in 0 ${BENCH_FLOOR_WORK-500 1000 2000}; do
        [[ $ns =~ ^[0-9]+$ ]] || die "BENCH_FLOOR_WORK: $ns is not a number of nanoseconds"
        local name=floor
        ((ns == 0)) || name="floor+${ns}ns"
        rm -f "$work/$name.addr"
        target/release/examples/floor "$work/answer.json" "$work/$name.addr" "$ns" 2>"$work/$name.log" &
        pids+=($!)
        floor_pids+=($!) floor_names+=("$name")
        wait_file "$work/$name.addr"
        floor_urls+=("http://$(cat "$work/$name.addr")")
    done

    local nginx_port nolog_port nginx_pid attempt
    for attempt in 1 2 3 4 5; do   # another process may take the port first: try another
        nginx_port=$(free_port)
        nolog_port=$(free_port)
        [[ $nolog_port != "$nginx_port" ]] || nolog_port=$((nginx_port + 1))
        sed -e "s|@WORK@|$work|g" -e "s|@PORT@|$nginx_port|g" -e "s|@NOLOG_PORT@|$nolog_port|g" \
            -e "s|@FAKE@|${FAKE_URL#http://}|g" \
            -e "s|@SECRET@|$(cat "$work/secret")|g" -e "s|@KEY@|$(cat "$work/keys/master.key")|g" \
            "$here/nginx.conf.in" >"$work/nginx.conf"
        chmod 600 "$work/nginx.conf"
        "$NGINX" -c "$work/nginx.conf" -p "$work" -e "$work/nginx-error.log" &
        nginx_pid=$!
        pids+=("$nginx_pid")
        for _ in $(seq 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$nginx_port") 2>/dev/null && break 2
            kill -0 "$nginx_pid" 2>/dev/null || break
            sleep 0.05
        done
        ! kill -0 "$nginx_pid" 2>/dev/null || die "nginx runs but does not listen on $nginx_port"
        ((attempt < 5)) || die "nginx did not start: $(tail -3 "$work/nginx-error.log")"
    done
    local nginx_url="http://127.0.0.1:$nginx_port"
    local nginx_before
    nginx_before=$(fake_calls)
    prime nginx "$nginx_url/v1/tokens" "$nginx_before"
    probe "$nginx_url/v1/tokens" "$work/nginx-answer.json" -H @"$work/auth.header"
    # nginx-nolog: the same nginx and cache on a port that writes no access log.
    # The floor+N rows run right after the floor, so each meets the same moment of the machine.
    local names=("${floor_names[@]}" broker nginx nginx-nolog)
    local urls=("${floor_urls[@]}" "$BROKER_URL" "$nginx_url" "http://127.0.0.1:$nolog_port")
    local spids=("${floor_pids[@]}" "$BROKER_PID" "$nginx_pid" "$nginx_pid")
    local extra extra_pids=()
    if [[ -n ${BENCH_EXTRA:-} ]]; then
        local broker_pid=$BROKER_PID broker_url=$BROKER_URL broker_admin=$BROKER_ADMIN
        for extra in $BENCH_EXTRA; do
            start_broker 100000 127.0.0.1:0 127.0.0.1:0 "${extra#*=}"
            prime "${extra%%=*}" "$BROKER_URL/v1/tokens" "$(fake_calls)"
            names+=("${extra%%=*}") urls+=("$BROKER_URL") spids+=("$BROKER_PID")
            extra_pids+=("$BROKER_PID")
        done
        BROKER_PID=$broker_pid BROKER_URL=$broker_url BROKER_ADMIN=$broker_admin
    fi
    if [[ ${BENCH_REDIS:-1} == 1 ]] && command -v redis-server >/dev/null; then
        local redis_port broker_pid=$BROKER_PID broker_url=$BROKER_URL broker_admin=$BROKER_ADMIN
        redis_port=$(free_port)
        mkdir -p "$work/redis"
        redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
            --dir "$work/redis" >"$work/redis.log" 2>&1 &
        pids+=($!)
        for _ in $(seq 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null && break
            sleep 0.05
        done
        (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/keys/cache.key")
        # A one-entry local tier: nearly every hit is a Redis GET and a decryption.
        SHARED_TOML="[cache.shared]
url = \"redis://127.0.0.1:$redis_port\"
encryption_key_file = \"$work/keys/cache.key\""
        start_broker 1
        SHARED_TOML=
        prime broker-redis "$BROKER_URL/v1/tokens" "$(fake_calls)"
        names+=(broker-redis) urls+=("$BROKER_URL") spids+=("$BROKER_PID")
        extra_pids+=("$BROKER_PID")
        BROKER_PID=$broker_pid BROKER_URL=$broker_url BROKER_ADMIN=$broker_admin
    fi
    local calls_before_load
    calls_before_load=$(fake_calls)

    echo "== answer sizes: broker $(wc -c <"$work/answer.json") B (POST /v1/tokens), floor the same bytes, nginx $(wc -c <"$work/nginx-answer.json") B (the fake's Truora-shaped answer)"
    echo "== $rounds round(s) of ${duration}s per server, wrk -t2 -c$conns, $keys keys at random"
    local i
    for i in "${!names[@]}"; do   # a short warm-up of each, not measured
        run_wrk "warm-${names[$i]}" "${urls[$i]}/v1/tokens" 2 "$conns" 2 BENCH_SECRET_FILE="$work/secret" BENCH_KEYS="$keys"
    done
    : >"$work/results"
    local r
    for r in $(seq "$rounds"); do
        for i in "${!names[@]}"; do
            local u0 s0 c0 u1 s1 c1
            read -r u0 s0 c0 < <(usage "${spids[$i]}")
            run_wrk "r$r-${names[$i]}" "${urls[$i]}/v1/tokens" 2 "$conns" "$duration" \
                BENCH_SECRET_FILE="$work/secret" BENCH_KEYS="$keys"
            read -r u1 s1 c1 < <(usage "${spids[$i]}")
            read -r n rps p50 p99 errors < <(parse_wrk "$work/r$r-${names[$i]}.wrk")
            ((errors == 0)) || die "${names[$i]}: $errors errors or non-2xx answers in round $r"
            local cpu_user cpu_sys
            read -r cpu_user cpu_sys < <(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" -v n="$n" \
                'BEGIN {printf "%.1f %.1f\n", u * 1e6 / hz / n, s * 1e6 / hz / n}')
            local preempted=$(((c1 - c0) * 1000 / n))
            echo "$r ${names[$i]} $rps $p50 $p99 $(awk -v u="$cpu_user" -v s="$cpu_sys" 'BEGIN {print u + s}') $preempted" >>"$work/results"
            printf '   round %d  %-14s %7d req/s   p50 %7.3f ms   p99 %7.3f ms   server CPU %5.1f us/req (user %4.1f, system %4.1f)   preempted %3d/1k req\n' \
                "$r" "${names[$i]}" "$rps" "$p50" "$p99" "$(awk -v u="$cpu_user" -v s="$cpu_sys" 'BEGIN {print u + s}')" "$cpu_user" "$cpu_sys" "$preempted"
        done
    done
    local misses_during_load=$(($(fake_calls) - calls_before_load))
    ((misses_during_load == 0)) || die "$misses_during_load upstream calls during the measured runs: not all hits"
    local broker_upstream
    broker_upstream=$(metric 'token_broker_cache_lookups_total{result="miss"}')

    echo
    echo "== summary (median of $rounds rounds; machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ))"
    local extra_names=""
    for extra in ${BENCH_EXTRA:-}; do extra_names+=" ${extra%%=*}"; done
    awk -v keys="$keys" -v conns="$conns" -v extra="$extra_names" -v work="${floor_names[*]:1}" '
        function median(a, n,   i, j, t) {
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        { k = ++count[$2]; rps[$2, k] = $3; p50[$2, k] = $4; p99[$2, k] = $5; cpu[$2, k] = $6; pre[$2, k] = $7; by_round[$1, $2] = $3; cpu_by_round[$1, $2] = $6; rounds[$1] = 1 }
        END {
            printf "| server | requests/s | p50 ms | p99 ms | server CPU us/req | preempted /1k req |\n|---|---:|---:|---:|---:|---:|\n"
            ns = split("floor " work " broker nginx nginx-nolog" extra " broker-redis", names, " ")
            for (s = 1; s <= ns; s++) {
                name = names[s]; n = count[name]
                if (n == 0) continue
                for (k = 1; k <= n; k++) { a[k] = rps[name, k]; b[k] = p50[name, k]; c[k] = p99[name, k]; d[k] = cpu[name, k]; e[k] = pre[name, k] }
                m_rps[name] = median(a, n); m_p99[name] = median(c, n)
                printf "| %s | %d | %.3f | %.3f | %.1f | %d |\n", name, m_rps[name], median(b, n), m_p99[name], median(d, n), median(e, n)
            }
            # The targets of the performance issue, each a median of per-round ratios.
            n = 0
            for (r in rounds) {
                n++
                f[n] = cpu_by_round[r, "broker"] / cpu_by_round[r, "floor"]
                g[n] = by_round[r, "broker"] / by_round[r, "nginx"]
                h[n] = by_round[r, "broker"] / by_round[r, "nginx-nolog"]
                if ((r, "floor+2000ns") in by_round) w2[n] = by_round[r, "broker"] / by_round[r, "floor+2000ns"]
                if ((r, "broker-redis") in by_round) rc[n] = cpu_by_round[r, "broker-redis"] / cpu_by_round[r, "broker"]
            }
            bf = median(f, n); bn = median(g, n); bq = median(h, n)
            printf "\nbroker/floor server CPU per request %.2f (target <= 1.3: %s)\n", bf, (bf <= 1.3 ? "met" : "NOT met")
            if (length(w2) == n && n > 0) {
                b2 = median(w2, n)
                printf "broker/floor+2000ns requests/s %.2f (target >= 1: %s)\n", b2, (b2 >= 1 ? "met" : "NOT met")
            } else printf "broker/floor+2000ns requests/s: not measured (BENCH_FLOOR_WORK leaves out 2000)\n"
            printf "broker/nginx requests/s %.2f (nginx logging each request; target >= 1.4: %s)\n", bn, (bn >= 1.4 ? "met" : "NOT met")
            printf "broker p99 %.3f ms (target < 5 ms: %s)\n", m_p99["broker"], (m_p99["broker"] < 5 ? "met" : "NOT met")
            if (length(rc) == n && n > 0) {
                rr = median(rc, n)
                printf "broker-redis/broker server CPU per request %.2f (target <= 2: %s)\n", rr, (rr <= 2 ? "met" : "NOT met")
            }
            printf "broker/nginx-nolog requests/s %.2f (nginx logging nothing, where the broker logs every request)\n", bq
            nw = split(work, wn, " ")
            for (w = 1; w <= nw; w++) {
                n = 0
                for (r in rounds) { n++; f[n] = by_round[r, wn[w]] / by_round[r, "floor"] }
                printf "%s/floor requests/s %.2f (the floor with that much CPU added to each request)\n", wn[w], median(f, n)
            }
            printf "(ratios are medians of the per-round ratios; each round ran the servers back to back)\n"
        }' "$work/results"
    echo "upstream calls during the measured runs: $misses_during_load (every request was a cache hit); broker misses in all: $broker_upstream"

    stop_pid "$nginx_pid"
    for ns in "${floor_pids[@]}"; do stop_pid "$ns"; done
    stop_pid "$BROKER_PID"
    # Both did log every request on their logging rows.
    [[ $(grep -c ' access: request ' "$work/broker-1.log") -gt $keys ]] || die "the broker wrote no access lines"
    [[ $(wc -l <"$work/nginx-access.log") -gt $keys ]] || die "nginx wrote no access log"
    for extra in "${extra_pids[@]}"; do stop_pid "$extra"; done
    startup
}

# Start-up to ready: exec of `token-broker serve` to the first 200 from /readyz, 5 times. The
# admin port is polled without forking (bash's /dev/tcp on the `true` builtin), then /readyz is
# asked once it accepts.
startup() {
    echo
    echo "== start-up to ready (exec to first 200 from /readyz), 5 runs"
    local times=() i
    for i in 1 2 3 4 5; do
        local port admin_port
        port=$(free_port)
        admin_port=$(free_port)
        [[ $port != "$admin_port" ]] || admin_port=$((port + 1))
        write_broker_config 100000 "127.0.0.1:$port" "127.0.0.1:$admin_port"
        local t0 t1 pid
        t0=$(date +%s%N)
        "$BROKER" serve --config "$work/broker.toml" 2>"$work/startup-$i.log" &
        pid=$!
        pids+=("$pid")
        local deadline=$((SECONDS + 10))
        until true 2>/dev/null <>"/dev/tcp/127.0.0.1/$admin_port"; do
            ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null || die "broker did not start: $(tail -3 "$work/startup-$i.log")"
        done
        curl -sf --max-time 5 "http://127.0.0.1:$admin_port/readyz" >/dev/null || die "/readyz did not answer 200"
        t1=$(date +%s%N)
        times+=($(((t1 - t0) / 1000000)))
        stop_pid "$pid"
    done
    local sorted median
    sorted=$(printf '%s\n' "${times[@]}" | sort -n | tr '\n' ' ')
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
    echo "   runs (ms): $sorted  median ${median} ms (target < 100 ms: $( ((median < 100)) && echo met || echo NOT met))"
    echo "   (an upper bound: it includes bash's fork and exec of the binary and one curl)"
    local size
    size=$(stat -c %s "$BROKER")
    echo "== release binary: $BROKER $((size / 1024)) KiB (target < 20 MB: $( ((size < 20000000)) && echo met || echo NOT met))"
}

misses() {
    build
    secrets
    start_fake
    echo "== what the broker adds to the upstream's latency on misses (every request a new user)"
    echo "   wrk -t1 -c\$C -d${duration}s: the fake Truora directly, then through the broker"
    start_broker 100000
    local c
    for c in 1 8; do
        run_wrk "direct-c$c" "$FAKE_URL/v1/api-keys" 1 "$c" "$duration" \
            BENCH_KEY_FILE="$work/keys/master.key" BENCH_PATH=/v1/api-keys BENCH_ORDER=unique BENCH_TAG="d$c"
        run_wrk "broker-c$c" "$BROKER_URL/v1/tokens" 1 "$c" "$duration" \
            BENCH_SECRET_FILE="$work/secret" BENCH_ORDER=unique BENCH_TAG="b$c"
        read -r _ drps dp50 dp99 derr < <(parse_wrk "$work/direct-c$c.wrk")
        read -r _ brps bp50 bp99 berr < <(parse_wrk "$work/broker-c$c.wrk")
        ((derr == 0 && berr == 0)) || die "errors during the miss runs (direct $derr, broker $berr)"
        awk -v c="$c" -v dr="$drps" -v d50="$dp50" -v d99="$dp99" -v br="$brps" -v b50="$bp50" -v b99="$bp99" 'BEGIN {
            printf "   c=%d  direct %6d req/s p50 %6.3f ms p99 %6.3f ms | broker %6d req/s p50 %6.3f ms p99 %6.3f ms | added p99 %.3f ms (target < 1 ms: %s)\n",
                c, dr, d50, d99, br, b50, b99, b99 - d99, (b99 - d99 < 1) ? "met" : "NOT met" }'
    done
    stop_pid "$BROKER_PID"

    local total=${BENCH_MISSES:-100000} bound=10000
    echo
    echo "== $total distinct misses, cache.max_entries = $bound: the broker's memory stays bounded by its cache"
    start_broker "$bound"
    local base_calls start_rss
    base_calls=$(fake_calls)
    start_rss=$(rss_kib "$BROKER_PID")
    printf '   %8s %10s %10s\n' misses entries 'RSS MiB'
    printf '   %8d %10s %10.1f\n' 0 0 "$(awk -v k="$start_rss" 'BEGIN {print k / 1024}')"
    local chunk=0 done_calls=0 full_rss=""
    local deadline=$((SECONDS + 240))
    while ((done_calls < total && SECONDS < deadline)); do
        chunk=$((chunk + 1))
        run_wrk "flood-$chunk" "$BROKER_URL/v1/tokens" 2 16 1 \
            BENCH_SECRET_FILE="$work/secret" BENCH_ORDER=unique BENCH_TAG="f$chunk"
        done_calls=$(($(fake_calls) - base_calls))
        local entries rss
        entries=$(metric token_broker_cache_entries)
        rss=$(rss_kib "$BROKER_PID")
        [[ -n $full_rss || $done_calls -lt $bound ]] || full_rss=$rss
        printf '   %8d %10s %10.1f\n' "$done_calls" "$entries" "$(awk -v k="$rss" 'BEGIN {print k / 1024}')"
        ((entries <= bound)) || die "the cache holds $entries entries, over cache.max_entries = $bound"
    done
    ((done_calls >= total)) || echo "   (stopped at the time bound, before $total misses)"
    local end_rss
    end_rss=$(rss_kib "$BROKER_PID")
    awk -v full="${full_rss:-$end_rss}" -v end="$end_rss" -v n="$done_calls" -v bound="$bound" 'BEGIN {
        printf "   RSS after the first second (the cache already at its %d-entry bound): %.1f MiB; after %d misses: %.1f MiB (%+.1f%%)\n", bound, full / 1024, n, end / 1024, (end - full) * 100 / full }'
    stop_pid "$BROKER_PID"
}

case $mode in
    hits) hits ;;
    misses) misses ;;
    startup) build && secrets && start_fake && startup ;;
    *) die "usage: $0 hits|misses|startup" ;;
esac
