#!/usr/bin/env bash
# Runs Dray and its peers interleaved, rep by rep, on one PostgreSQL, then prints the
# side-by-side table with Dray/peer ratios; then W6 (latency while VACUUM is held back, 4 minutes
# of steady load) once. Usage: bench/compare.sh   (env: DRAY_BENCH_DATABASE_URL, N=20000, REPS=3,
# OUT=bench/results.jsonl, W6=1 to run W6, 0 not to)
set -euo pipefail
cd "$(dirname "$0")"
URL=${DRAY_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
N=${N:-20000}
REPS=${REPS:-3}
OUT=${OUT:-results.jsonl}
if [ ! -x peers/node_modules/.bin/node ] || [ ! -d peers/node_modules/@dbos-inc/dbos-sdk ]; then
  (cd peers && npm ci --no-audit --no-fund)
fi
NODE="$PWD/peers/node_modules/.bin/node"
cargo build --release -p dray-cli
DRAY=../target/release/dray
: > "$OUT"
version() { "$NODE" -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1])).version)' "peers/node_modules/$1/package.json"; }
# Versions and machine, once.
"$DRAY" --database "$URL" --json bench --reps 1 --n 10 --workload plain-insert > "$OUT.meta"
head -n 1 "$OUT.meta" >> "$OUT"
rm -f "$OUT.meta"
echo "{\"system\":\"meta-peers\",\"node\":\"$($NODE --version)\",\"graphile-worker\":\"$(version graphile-worker)\",\"pg-boss\":\"$(version pg-boss)\",\"dbos-sdk\":\"$(version @dbos-inc/dbos-sdk)\"}" >> "$OUT"
for rep in $(seq 1 "$REPS"); do
  echo "rep $rep/$REPS" >&2
  for w in plain-insert W1-single W1-batch floor W2 W2-tuned paced-insert W3 W3-remote W4 W5 H1 H2; do
    "$DRAY" --database "$URL" --json bench --reps 1 --n "$N" --workload "$w" | tail -n +2 >> "$OUT"
    case "$w" in
      W1-single|W1-batch|W2|W2-tuned|W3)
        "$NODE" peers/graphile.mjs "$w" "$N" "$URL" >> "$OUT"
        "$NODE" peers/pgboss.mjs "$w" "$N" "$URL" >> "$OUT"
        ;;
      W4)
        "$NODE" peers/dbos.mjs W4 "$N" "$URL" >> "$OUT"
        ;;
    esac
  done
done
if [ "${W6:-1}" = 1 ]; then
  echo "W6 (4 minutes)" >&2
  "$DRAY" --database "$URL" --json bench --reps 1 --workload W6 | tail -n +2 >> "$OUT"
fi
python3 compare.py "$OUT"
