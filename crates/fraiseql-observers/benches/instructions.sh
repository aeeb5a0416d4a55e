#!/usr/bin/env bash
# Instructions per event, counted by valgrind's callgrind (issue 12): figures that do not move
# with the machine's load or speed, unlike times. (`perf stat -e instructions` would be faster,
# but virtual machines often have no hardware counters: it answers "not supported".)
#
# Usage, from anywhere in the workspace (same CARGO_TARGET_DIR as your other builds):
#   crates/fraiseql-observers/benches/instructions.sh          # both parts below
#   crates/fraiseql-observers/benches/instructions.sh micro    # the pure per-event stages, ~3 min
#   crates/fraiseql-observers/benches/instructions.sh e2e      # the daemon's drain, ~10 min
# Environment: N (repetitions per micro stage, default 2000), E2E_EVENTS (default 2000),
# RUNS (pairs of e2e runs, default 3).
#
# micro: each stage of `benches/micro.rs` (`micro --repeat STAGE N`: decode, condition, match,
# body, signature, and `drain_event`, what the drain does per event outside I/O) runs N and 2N
# times under callgrind; instructions per call = (I(2N) - I(N)) / N, which removes the start-up
# and the setup. The micro bench uses the system allocator (glibc malloc).
#
# e2e: the shipped daemon (`fraiseql-observers run --config FILE`, release build, mimalloc,
# `/metrics` on) drains a backlog of E2E_EVENTS and of 2 x E2E_EVENTS changes to the bench's
# local receiver under callgrind (only the daemon is counted); per event = (I(2N) - I(N)) / N.
# Results also go to <target>/bench-results/e2e-partial.json.
set -euo pipefail
cd "$(dirname "$0")/../../.."
what=${1:-all}
N=${N:-2000}
command -v valgrind >/dev/null || {
	echo "valgrind is not installed (apt-get install valgrind)" >&2
	exit 1
}

# Instructions callgrind counted while running "$@".
collected() {
	local log n
	log=$(mktemp)
	valgrind --tool=callgrind --callgrind-out-file=/dev/null --log-file="$log" "$@" >/dev/null
	n=$(sed -n 's/.*Collected : *\([0-9]*\).*/\1/p' "$log")
	rm -f "$log"
	echo "$n"
}

if [[ $what == all || $what == micro ]]; then
	micro=$(cargo bench -p fraiseql-observers --bench micro --no-run 2>&1 |
		sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
	echo "Instructions per call, $N and $((2 * N)) calls under callgrind ($(git rev-parse --short HEAD), $(date -u +%F))"
	echo
	echo "| stage | instructions per call |"
	echo "|---|---:|"
	for stage in $("$micro" --repeat list); do
		a=$(collected "$micro" --repeat "$stage" "$N")
		b=$(collected "$micro" --repeat "$stage" $((2 * N)))
		echo "| $stage | $(((b - a) / N)) |"
	done
	echo
fi

if [[ $what == all || $what == e2e ]]; then
	cargo build --release -p fraiseql-observers-cli
	cargo bench -p fraiseql-observers --bench e2e -- --scenario instructions --no-peer \
		--instruction-events "${E2E_EVENTS:-2000}" --runs "${RUNS:-3}"
fi
