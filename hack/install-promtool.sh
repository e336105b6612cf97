#!/usr/bin/env bash
# promtool, which checks and unit-tests the chart's alert rules and dashboard queries
# (tests/unit/deploy/test_chart_monitoring.py): Debian's `prometheus` package brings it. Needs
# root and apt-get; elsewhere it says so and those tests fail naming what is missing.
set -euo pipefail

if command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: promtool is missing and installing Debian's prometheus package needs root and" \
       "apt-get: the chart's monitoring tests will fail until promtool is on PATH" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Under systemd the package would also start a Prometheus server on :9090: only the tool is
# wanted, so a policy-rc.d refuses that start for the length of the install.
policy=/usr/sbin/policy-rc.d
had_policy=false
[ -e "$policy" ] && had_policy=true
if ! $had_policy; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable prometheus >/dev/null 2>&1 || true
fi
promtool --version | head -1
