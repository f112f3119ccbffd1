#!/usr/bin/env bash
# Load test of `evax serve` with oha (cargo install oha): 1, 8 and 64 concurrent clients, N
# requests each (default 2000), EVA-X-S fixture weights, one NIH radiograph as the body.
# Reports throughput, p50/p99 latency, errors, the server's resident and peak memory after the
# first half and at the end of each run, and `evax predict`'s batch throughput on the same
# image for comparison. Results: $OUT/load.json (and the oha JSON per level).
#
#   bash scripts/load-test.sh [OUT_DIR]      (EVAX_SHARED: the shared folder, default ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${EVAX_SHARED:-../shared}
OUT=${1:-target/load-test}
N=${N:-2000}
LEVELS=${LEVELS:-"1 8 64"}
WEIGHTS=${WEIGHTS:-$SHARED/fixtures/eva_x_s_d2_covidx480_ft.pth}
IMAGE=${IMAGE:-$SHARED/fixtures/images/00003440_000.png}
PORT=${PORT:-18080}
BATCH=${BATCH:-16}
command -v oha >/dev/null || { echo "oha not found: cargo install oha" >&2; exit 2; }
mkdir -p "$OUT"
cargo build --release --quiet
EVAX=target/release/evax

# evax predict's batch throughput on the same image (256 copies through a list file).
LIST="$OUT/list.txt"
for _ in $(seq 256); do echo "$IMAGE"; done > "$LIST"
start=$(date +%s.%N)
$EVAX predict --weights "$WEIGHTS" --batch "$BATCH" -o "$OUT/predict.csv" "$LIST" 2>/dev/null
end=$(date +%s.%N)
predict_ips=$(python3 -c "print(256 / ($end - $start))")
echo "evax predict: $predict_ips img/s (batch $BATCH)"

$EVAX serve --weights "s=$WEIGHTS" --addr "127.0.0.1:$PORT" --max-batch "$BATCH" \
    --queue 512 2>"$OUT/serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
URL="http://127.0.0.1:$PORT/v1/models/s/predict"
mem() { # resident and peak kB of the server
    awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{print r, h}' "/proc/$SERVER/status"
}
served() {
    curl -s "http://127.0.0.1:$PORT/metrics" |
        awk '/^evax_requests_total\{endpoint="predict"/{n+=$2} END{print n+0}'
}
# Warm-up (first-touch allocations, thread pools).
oha -n 32 -c 8 -m POST -D "$IMAGE" --no-tui --output-format quiet "$URL"

echo "{\"predict_img_per_s\": $predict_ips, \"levels\": [" > "$OUT/load.json"
first=1
for c in $LEVELS; do
    before=$(served)
    oha -n "$N" -c "$c" -m POST -D "$IMAGE" --no-tui --output-format json \
        -o "$OUT/oha-c$c.json" "$URL" &
    LOAD=$!
    half=""
    while kill -0 $LOAD 2>/dev/null; do
        if [ -z "$half" ] && [ $(( $(served) - before )) -ge $(( N / 2 )) ]; then
            half=$(mem)
        fi
        sleep 0.2
    done
    wait $LOAD
    endmem=$(mem)
    [ -n "$half" ] || half=$endmem
    line=$(python3 - "$OUT/oha-c$c.json" "$c" "$half" "$endmem" "$predict_ips" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = int(sys.argv[2]); half = sys.argv[3].split(); end = sys.argv[4].split()
s = r["summary"]; p = r["latencyPercentiles"]
codes = r.get("statusCodeDistribution", {})
ok = codes.get("200", 0)
errors = sum(v for k, v in codes.items() if k != "200") + sum(r.get("errorDistribution", {}).values())
out = {
    "clients": c, "requests": ok + errors, "ok": ok, "errors": errors,
    "img_per_s": s["requestsPerSec"], "p50_ms": p["p50"] * 1000, "p99_ms": p["p99"] * 1000,
    "rss_mib_half": int(half[0]) / 1024, "peak_mib_half": int(half[1]) / 1024,
    "rss_mib_end": int(end[0]) / 1024, "peak_mib_end": int(end[1]) / 1024,
    "vs_predict": s["requestsPerSec"] / float(sys.argv[5]),
}
print(json.dumps(out))
PY
)
    echo "$line"
    [ $first = 1 ] || echo "," >> "$OUT/load.json"
    first=0
    echo "$line" >> "$OUT/load.json"
done
echo "]}" >> "$OUT/load.json"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^evax_batch_size_(sum|count)' || true
kill -TERM $SERVER
wait $SERVER || true
grep -q "stopped" "$OUT/serve.log" && echo "server stopped cleanly on SIGTERM"
