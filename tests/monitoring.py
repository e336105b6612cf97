"""The chart's Grafana dashboards as PromQL: shared by the unit tests (which parse every panel
query with promtool) and the real-node tier (which runs every one against a real Prometheus).

A panel's query names Grafana's variables; `as_promql` expands them as Grafana does before it
sends the query: the interval variables to durations, a label variable to the chosen value
(regex-escaped: the dashboards' variables are multi-value, which Grafana escapes for `=~`) or,
when none is chosen, to the variable's All value `.*`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[1] / "charts" / "kubetune" / "dashboards"

GRAFANA_VARIABLES = {
    "$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
}  # fmt: skip
"""The interval variables for a view of the last hour at a one-minute step."""

# The characters Grafana escapes in a multi-value variable's value for a Prometheus regex
# matcher (its prometheusSpecialRegexEscape), each with a backslash that the PromQL string
# literal itself needs escaped.
_GRAFANA_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard the chart ships, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def variable_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["query"]["query"]


def grafana_regex_escape(value: str) -> str:
    return _GRAFANA_REGEX_SPECIAL.sub(lambda match: "\\\\" + match.group(0),
                                      value.replace("\\", "\\\\\\\\"))  # fmt: skip


def grafana_intervals(
    step_seconds: int, scrape_interval_seconds: int, range_seconds: int
) -> dict[str, str]:
    """The interval variables Grafana gives a panel drawn at `step_seconds` per point over
    `range_seconds`, with a datasource whose scrape interval is `scrape_interval_seconds`:
    `$__rate_interval` is max($__interval + scrape interval, 4 x scrape interval)."""
    rate = max(step_seconds + scrape_interval_seconds, 4 * scrape_interval_seconds)
    return {"$__rate_interval": f"{rate}s", "$__interval": f"{step_seconds}s",
            "$__range": f"{range_seconds}s"}  # fmt: skip


def as_promql(
    expr: str,
    chosen: Mapping[str, str] | None = None,
    intervals: Mapping[str, str] = GRAFANA_VARIABLES,
) -> str:
    """A panel's query with Grafana's variables replaced: the interval ones by `intervals`,
    each label variable by its `chosen` value (escaped) or else by All (`.*`)."""
    for variable, value in intervals.items():
        expr = expr.replace(variable, value)
    chosen = chosen or {}

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        return grafana_regex_escape(chosen[name]) if name in chosen else ".*"

    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", value_of, expr)
