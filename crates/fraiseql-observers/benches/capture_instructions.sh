#!/usr/bin/env bash
# What capture costs a writer, in instructions (issue 12, item 4): PostgreSQL's own instructions
# per single-row INSERT into the e2e bench's tb_order, plain and captured, counted by valgrind's
# callgrind on a single-user backend of a scratch cluster (no other process in the count, no
# load or machine speed in the figure).
#
#   crates/fraiseql-observers/benches/capture_instructions.sh [VARIANT.sql ...]
#
# Each variant: N = 200 and 2N statements (PREPAREd INSERT, one per transaction, jit off: a
# single-user backend has no JIT provider loaded anyway), (I(2N) - I(N)) / N. Variants: `plain`
# (no capture), `capture` (the migrations as shipped), or a SQL file applied after the migrations
# and before capture is enabled (e.g. an older fraiseql_capture.write, to compare). Needs
# PostgreSQL's server binaries (pg_config --bindir or /usr/lib/postgresql/15/bin), valgrind,
# python3; run as root it runs the cluster as the user postgres. The cluster lives in a
# temporary directory, removed at the end.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
crate="$(dirname "$here")"
bindir="$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)"
work="$(mktemp -d /tmp/fo-capture-instructions.XXXXXX)"
run_as=()
if [ "$(id -u)" = 0 ]; then chown postgres "$work"; run_as=(runuser -u postgres --); fi
trap '"${run_as[@]}" "$bindir/pg_ctl" -D "$work/data" stop -m immediate >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
N=200
variants=("$@"); [ ${#variants[@]} -eq 0 ] && variants=(plain capture)

# The e2e bench's table and single-row insert (benches/e2e/data.rs), as SQL files.
python3 - "$crate/benches/e2e/data.rs" "$work" "$N" <<'PY'
import re, sys
src = open(sys.argv[1]).read(); work = sys.argv[2]; n = int(sys.argv[3])
schema = re.search(r'pub const SCHEMA: &str = "(.*?)";', src, re.S).group(1)
cols = re.search(r'pub const ORDER_COLUMNS: &str = "(.*?)";', src, re.S).group(1)
cols = ' '.join(cols.replace('\\\n', ' ').replace('\\', ' ').split())
vals = re.search(r'pub fn order_values\(g: &str, id: &str\) -> String \{\s*format!\(\s*"(.*?)"\s*\)', src, re.S).group(1)
vals = ' '.join(vals.replace('{g}', 's.g').replace('{id}', 'gen_random_uuid()').split())
open(f'{work}/schema.sql', 'w').write(schema)
insert = f"PREPARE ins(int) AS INSERT INTO tb_order ({cols}) SELECT {vals} FROM (SELECT $1::int AS g) s;\n"
for k in (n, 2 * n):
    with open(f'{work}/run_{k}.sql', 'w') as f:
        f.write("SET jit = off;\n" + insert)
        f.writelines(f"EXECUTE ins({i + 1000});\n" for i in range(k))
PY
chmod -R a+rX "$work"
"${run_as[@]}" "$bindir/initdb" -D "$work/data" -U postgres --auth=trust >/dev/null
start() { "${run_as[@]}" "$bindir/pg_ctl" -D "$work/data" -o "-p 5499 -k $work -c listen_addresses=''" -l "$work/log" start -w >/dev/null; }
stop() { "${run_as[@]}" "$bindir/pg_ctl" -D "$work/data" stop -m fast -w >/dev/null; }
q() { psql -h "$work" -p 5499 -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
start
q -d postgres -c "CREATE DATABASE wc"
for f in "$crate"/migrations/*.sql; do q -d wc -1 -f "$f" >/dev/null; done
q -d wc -f "$work/schema.sql" >/dev/null
stop
for v in "${variants[@]}"; do
  start
  q -d wc -c "SELECT core.observer_disable_capture('tb_order') FROM core.observer_capture WHERE table_name = 'tb_order'::regclass" >/dev/null
  case "$v" in
    plain) ;;
    capture) q -d wc -c "SELECT core.observer_enable_capture('tb_order', 'Order', 'fk_customer_org')" >/dev/null ;;
    *) q -d wc -f "$v" >/dev/null; q -d wc -c "SELECT core.observer_enable_capture('tb_order', 'Order', 'fk_customer_org')" >/dev/null ;;
  esac
  stop
  declare -A count
  for k in $N $((2 * N)); do
    start; q -d wc -c "TRUNCATE tb_order, core.tb_entity_change_log" >/dev/null; q -d wc -c "CHECKPOINT" >/dev/null; stop
    "${run_as[@]}" valgrind --tool=callgrind --callgrind-out-file="$work/cg.$k.out" \
      "$bindir/postgres" --single -D "$work/data" wc < "$work/run_$k.sql" > "$work/single.$k.log" 2>&1
    if grep -q "ERROR" "$work/single.$k.log"; then grep "ERROR" "$work/single.$k.log" | head -3; exit 1; fi
    count[$k]=$(awk '/^summary:/ {print $2}' "$work/cg.$k.out")
  done
  echo "$v: $(( (count[$((2 * N))] - count[$N]) / N )) instructions per single-row INSERT (I($N) = ${count[$N]}, I($((2 * N))) = ${count[$((2 * N))]})"
done
