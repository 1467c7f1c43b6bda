#!/usr/bin/env bash
# `make run`: a demo dataset, loaded and served, with a first look at the answers.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-50051}
PROFILES=${PROFILES:-100000}
ADDR=127.0.0.1:$PORT
DATA=demo/data
DB=demo/store

if [ ! -f "$DATA/profiles.jsonl" ]; then
  echo "== generating $PROFILES demo profiles with their events and orders into $DATA"
  "$BIN/bitseg" gen "$DATA" --profiles "$PROFILES" --seed 7
fi
if [ ! -f "$DB/data.mdb" ]; then
  echo "== loading $DATA into $DB"
  "$BIN/bitseg" load "$DATA" --db "$DB"
fi

echo "== starting the server on $ADDR"
"$BIN/bitseg" serve --db "$DB" --port "$PORT" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 100); do
  "$BIN/bitseg" count --addr "$ADDR" --rule '{"all": true}' >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "the server did not start" >&2; exit 1; }
  sleep 0.1
done

show() { echo; echo "\$ bitseg $*"; "$BIN/bitseg" "$@" --addr "$ADDR"; }
GERMANS='{"and": [{"field": "country", "op": "eq", "value": "DE"},
                  {"field": "age", "op": "between", "value": [18, 40]},
                  {"not": {"field": "tags", "op": "in", "value": ["churn_risk"]}}]}'
show count --rule "$GERMANS" --as-of 2026-11-01T00:00:00Z
show members --rule "$GERMANS" --limit 5 --as-of 2026-11-01T00:00:00Z
show check u42 --rule "$GERMANS" --as-of 2026-11-01T00:00:00Z
show count --as-of 2026-11-01T00:00:00Z --rule '{"event": "popup_opened",
  "window": {"last_days": 30}, "having": {"agg": "count", "op": "gte", "value": 3}}'
echo
echo "bitseg is serving $DB on $ADDR (grpc health and reflection on). Ctrl-C stops it."
wait $server
