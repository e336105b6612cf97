#!/usr/bin/env bash
# make test's pytest run, in two lanes at once (usage: test-lanes.sh PYTHON [PYTEST ARGS...]).
#
# The trainer tier keeps both CPUs busy with real training for most of the run, then the
# real-node tier does the same inside its pods. The unit and e2e tiers mostly wait: on a
# control plane on loopback, on the operator's passes. Run one after the other they added
# about 8 minutes to a 50-minute run; beside the trainer tier they cost it a fraction of that.
# The real-node tier, whose pods are sized to the node's 2 CPUs, runs last in its lane, after
# the API lane has long ended, so nothing else competes with it.
#
# Each lane is its own pytest session (its own fixtures, its own --basetemp). The API lane's
# output goes to a file, printed when both lanes end, and the run fails when either lane does.
set -uo pipefail

python=$1
shift
# Short: the real node's sockets live under it (a socket's path is at most 107 bytes).
base=$(mktemp -d -t kt-lanes.XXXXXX)
api_log="$base/api-lane.log"
cleanup() {
    # The lanes' tmp_paths of passing tests are already gone (tmp_path_retention_policy);
    # a failure's stay under $base for whoever looks, with the log.
    if [[ ${status:-1} -eq 0 ]]; then rm -rf "$base"; fi
}
trap cleanup EXIT

"$python" -m pytest tests/unit tests/e2e --basetemp="$base/api" "$@" >"$api_log" 2>&1 &
api=$!
echo "== the API lane (tests/unit, tests/e2e) runs in the background: $api_log"

echo "== the CPU lane (tests/trainer, tests/realnode)"
"$python" -m pytest tests/trainer tests/realnode --basetemp="$base/cpu" "$@"
cpu_status=$?

wait "$api"
api_status=$?
echo
echo "== the API lane (tests/unit, tests/e2e), exit status $api_status"
cat "$api_log"
echo
echo "== lanes: CPU (trainer, realnode) $cpu_status, API (unit, e2e) $api_status"
status=$(( cpu_status != 0 || api_status != 0 ))
exit "$status"
