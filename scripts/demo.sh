#!/usr/bin/env bash
# `make run`: a demo dataset, loaded and served, with a first look at the answers.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-50051}
HTTP_PORT=${HTTP_PORT:-8051}
PROFILES=${PROFILES:-100000}
ADDR=127.0.0.1:$PORT
DATA=demo/data
DB=demo/store

# The demo data leads up to the moment it was generated (--present now), so the examples
# in the README, which evaluate at the current time, find recent events and orders. Data
# older than a week (or from before --present existed: no stamp) is generated afresh.
STAMP=demo/.generated-now
if [ -f "$DATA/profiles.jsonl" ] && { [ ! -f "$STAMP" ] || [ -n "$(find "$STAMP" -mtime +7)" ]; }; then
  echo "== the demo data is more than a week old: generating it again"
  rm -rf "$DATA" "$DB"
fi
if [ ! -f "$DATA/profiles.jsonl" ]; then
  echo "== generating $PROFILES demo profiles with their events and orders into $DATA"
  rm -rf "$DB"
  "$BIN/bitseg" gen "$DATA" --profiles "$PROFILES" --seed 7 --present now
  touch "$STAMP"
fi
if [ ! -f "$DB/data.mdb" ]; then
  echo "== loading $DATA into $DB"
  "$BIN/bitseg" load "$DATA" --db "$DB"
fi

echo "== starting the server on $ADDR"
"$BIN/bitseg" serve --db "$DB" --port "$PORT" --http "$HTTP_PORT" &
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
show count --rule "$GERMANS"
show members --rule "$GERMANS" --limit 5
show check u42 --rule "$GERMANS"
show count --rule '{"event": "popup_opened",
  "window": {"last_days": 30}, "having": {"agg": "count", "op": "gte", "value": 3}}'
echo
echo "bitseg is serving $DB on $ADDR (grpc health and reflection on). Ctrl-C stops it."
echo "The console: http://127.0.0.1:$HTTP_PORT/ (open it in a browser)"
wait $server
