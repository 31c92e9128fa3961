#!/usr/bin/env bash
# The README's performance table from one command: runs every benchmark (release builds) and
# prints the machine it ran on, then one Markdown table of each benchmark's headline rows (the
# lines a bench prints starting with "| "). Full output of each bench goes to target/bench/.
#
#   examples/bench.sh            proxy, issuer Certify, rotation latency
#   examples/bench.sh --fleet    the same plus the 100,000-host fleet simulation (tens of minutes)
#
# BENCH_SECS (seconds per figure) and FLEET_HOSTS are passed through to the benches.
set -euo pipefail
cd "$(dirname "$0")/.."

benches=("proxy-lib proxy" "issuer certify" "e2e rotation")
if [ "${1:-}" = "--fleet" ]; then
  benches+=("e2e fleet")
elif [ $# -gt 0 ]; then
  echo "usage: examples/bench.sh [--fleet]" >&2
  exit 2
fi

out=target/bench
mkdir -p "$out"
cargo bench --workspace --no-run --quiet

rows=()
for b in "${benches[@]}"; do
  set -- $b
  echo "running: cargo bench -p $1 --bench $2 (output in $out/$2.txt)" >&2
  if ! cargo bench --quiet -p "$1" --bench "$2" >"$out/$2.txt" 2>&1; then
    echo "bench $2 failed; its output:" >&2
    tail -n 30 "$out/$2.txt" >&2
    exit 1
  fi
  while IFS= read -r line; do rows+=("$line"); done < <(grep '^| ' "$out/$2.txt" || true)
done

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
echo
echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores of ${cpu:-an unknown CPU}, $mem, Linux $(uname -r);"
echo "load generator, servers and app on the same cores; ratios come from interleaved rounds of one run."
echo
echo "| what | measured | aim |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
