#!/usr/bin/env bash
# Soak run (not a CI test): one issuer, HOSTS hosts each running the rotator daemon and
# mtls-proxy in front of an echo app, all on loopback, with short certificates (LIFETIME,
# default 10 s: a rotation every ~7 s per host) and steady client load through the mesh:
# every host's app talks to the next host's app through its own proxy's outbound listener and
# the next proxy's inbound one (mTLS both ways), once every INTERVAL seconds per host.
#
# At the end it prints the rotations, the failed requests (must be 0), and each process's
# peak RSS and open file descriptors at start and end, and exits non-zero on any failure.
#
#   examples/soak.sh [DURATION_SECONDS]     (default 3600; HOSTS=20 LIFETIME=10s INTERVAL=0.2)
#
# Needs the release binaries (`cargo build --release --workspace` is run first) and python3.
set -euo pipefail

DURATION=${1:-3600}
HOSTS=${HOSTS:-20}
LIFETIME=${LIFETIME:-10s}
INTERVAL=${INTERVAL:-0.2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d -t soak-XXXXXX)
BIN="$ROOT/target/release"
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

echo "soak: building release binaries" >&2
cargo build --release --workspace --quiet --manifest-path "$ROOT/Cargo.toml"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url, what
    for _ in $(seq 1 600); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "soak: $2 never answered $1" >&2
    exit 1
}
proc_stats() { # pid -> "rss_peak_kib fds"
    local hwm fds
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$1/fd" 2>/dev/null | wc -l)
    echo "$hwm $fds"
}

echo "soak: working dir $WORK; $HOSTS hosts, lifetime $LIFETIME, ${DURATION}s" >&2
"$BIN/issuer" init --dir "$WORK/issuer" >/dev/null
ISSUER_PORT=$(port)
ISSUER_ADMIN=$(port)
"$BIN/issuer" serve --dir "$WORK/issuer" --listen "127.0.0.1:$ISSUER_PORT" \
    --admin "127.0.0.1:$ISSUER_ADMIN" --lifetime "$LIFETIME" --min-lifetime 5s \
    >"$WORK/issuer.log" 2>&1 &
PIDS+=($!)
NAMES=("issuer")
wait_http "http://127.0.0.1:$ISSUER_ADMIN/ready" issuer

declare -a INBOUND OUTBOUND APP PROXY_ADMIN ROTATOR_ADMIN
for i in $(seq 0 $((HOSTS - 1))); do
    INBOUND[$i]=$(port); OUTBOUND[$i]=$(port); APP[$i]=$(port)
    PROXY_ADMIN[$i]=$(port); ROTATOR_ADMIN[$i]=$(port)
done
for i in $(seq 0 $((HOSTS - 1))); do
    h="$WORK/host$i"; mkdir -p "$h/certs"
    id="host$i.soak.serviceaccount.identity.linkerd.cluster.local"
    next=$(( (i + 1) % HOSTS ))
    next_id="host$next.soak.serviceaccount.identity.linkerd.cluster.local"
    "$BIN/issuer" token create --dir "$WORK/issuer" --identity "$id" --out "$h/token" >/dev/null
    # The app: an echo server.
    python3 - "${APP[$i]}" >"$h/app.log" 2>&1 <<'PY' &
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            b = self.request.recv(65536)
            if not b:
                return
            self.request.sendall(b)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
PY
    PIDS+=($!); NAMES+=("app$i")
    "$BIN/mtls-proxy" --certs "$h/certs" \
        --inbound "127.0.0.1:${INBOUND[$i]}=127.0.0.1:${APP[$i]}" \
        --outbound "127.0.0.1:${OUTBOUND[$i]}=127.0.0.1:${INBOUND[$next]}@$next_id" \
        --admin "127.0.0.1:${PROXY_ADMIN[$i]}" >"$h/proxy.log" 2>&1 &
    PIDS+=($!); NAMES+=("mtls-proxy$i")
    cat >"$h/rotator.toml" <<EOF
identity = "$id"
dir = "$h/certs"
trust_anchors = "$WORK/issuer/ca.crt"
token_file = "$h/token"
issuer_addr = "127.0.0.1:$ISSUER_PORT"
[reload]
http = "http://127.0.0.1:${PROXY_ADMIN[$i]}/reload"
[verify]
addr = "127.0.0.1:${INBOUND[$i]}"
[metrics]
listen = "127.0.0.1:${ROTATOR_ADMIN[$i]}"
EOF
    "$BIN/rotator" run --config "$h/rotator.toml" >"$h/rotator.log" 2>&1 &
    PIDS+=($!); NAMES+=("rotator$i")
done
for i in $(seq 0 $((HOSTS - 1))); do
    wait_http "http://127.0.0.1:${PROXY_ADMIN[$i]}/ready" "mtls-proxy$i"
    wait_http "http://127.0.0.1:${ROTATOR_ADMIN[$i]}/ready" "rotator$i"
done

declare -a START_STATS
for k in "${!PIDS[@]}"; do START_STATS[$k]=$(proc_stats "${PIDS[$k]}"); done
echo "soak: all ready; load for ${DURATION}s" >&2

# The load: per host, one request every INTERVAL through its outbound listener (a fresh
# connection each time, so every request is a new mTLS handshake with the next host's proxy).
python3 - "$DURATION" "$INTERVAL" "${OUTBOUND[@]}" >"$WORK/load.out" 2>"$WORK/load.err" <<'PY'
import socket, sys, threading, time
duration, interval, ports = float(sys.argv[1]), float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
ok = [0] * len(ports); failed = [0] * len(ports); errors = []
def run(i, port):
    end = time.time() + duration
    n = 0
    while time.time() < end:
        n += 1
        msg = f"host{i} request {n}\n".encode()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    b = s.recv(65536)
                    if not b:
                        break
                    got += b
            if got == msg:
                ok[i] += 1
            else:
                failed[i] += 1; errors.append(f"host{i}: echoed {got!r}")
        except Exception as e:
            failed[i] += 1; errors.append(f"host{i}: {e}")
        time.sleep(interval)
threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(ports)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(ok), sum(failed))
for e in errors[:20]:
    print(e, file=sys.stderr)
PY

read -r OK FAILED <"$WORK/load.out"
ROTATIONS=0
for i in $(seq 0 $((HOSTS - 1))); do
    n=$(curl -fsS "http://127.0.0.1:${ROTATOR_ADMIN[$i]}/metrics" \
        | awk '/^rotator_rotations_total\{result="success"\}/ {print $2}')
    ROTATIONS=$((ROTATIONS + ${n:-0}))
done
echo "soak: ${DURATION}s, $HOSTS hosts, lifetime $LIFETIME"
echo "soak: rotations $ROTATIONS; requests ok $OK, failed $FAILED"
printf '%-14s %14s %14s %10s %10s\n' process rss_peak_start rss_peak_end fds_start fds_end
ALIVE=1
for k in "${!PIDS[@]}"; do
    read -r r0 f0 <<<"${START_STATS[$k]}"
    if kill -0 "${PIDS[$k]}" 2>/dev/null; then
        read -r r1 f1 <<<"$(proc_stats "${PIDS[$k]}")"
    else
        r1=exited; f1=-; ALIVE=0
    fi
    case "${NAMES[$k]}" in app*) continue ;; esac
    printf '%-14s %11s KiB %11s KiB %10s %10s\n' "${NAMES[$k]}" "$r0" "$r1" "$f0" "$f1"
done
if [ "$FAILED" != 0 ] || [ "$ALIVE" != 1 ] || [ "$ROTATIONS" = 0 ]; then
    echo "soak: FAILED (logs in $WORK)"; cat "$WORK/load.err"; trap - EXIT; cleanup; exit 1
fi
echo "soak: OK"
trap - EXIT
cleanup
rm -rf "$WORK"
