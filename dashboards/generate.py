#!/usr/bin/env python3
"""weft's Grafana dashboards, as code: the one place that names the metrics
they query. Writes dashboards/*.json; `--check` fails when the committed JSON
differs from what this file generates (the test suite runs it).

Every query is also run against a real agent's metrics by
tests/tests/dashboards.rs, which fails on unknown metric names and on panels
that return nothing for the lab's traffic.

Usage: python3 dashboards/generate.py [--check]
Needs only the Python standard library.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The data source the provisioning file declares (provisioning/datasources/).
DATASOURCE_UID = "weft-prometheus"
DATASOURCE_NAME = "Prometheus (weft)"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39

# Range and selectors shared by the queries. Flow metrics are filtered on
# their destination side: the namespace and workload being looked at.
RATE = "$__rate_interval"
NODE = 'instance=~"$instance"'
DEST = NODE + ', destination_namespace=~"$namespace", destination_workload=~"$workload"'
# Gives a per-instance series the node name the agent reports.
BY_NODE = " * on (instance) group_left (node) max by (instance, node) (weft_agent_info)"


def rate(metric, sel, by=None, fn="rate", window=RATE):
    """sum [by (labels)] (fn(metric{sel}[window]))"""
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}({fn}({metric}{{{sel}}}[{window}]))"


def increase_in_range(metric, sel):
    """How much a counter grew over the dashboard's time range."""
    return rate(metric, sel, fn="increase", window="$__range")


def per_node(expr):
    """An instance-level expression summed per node name."""
    return f"sum by (node) ({expr}{BY_NODE})"


def quantile(q, sel, by):
    buckets = rate("weft_http_request_duration_seconds_bucket", sel, by=f"le, {by}" if by else "le")
    return f"histogram_quantile({q}, {buckets})"


def success_rate(sel, by=None):
    """Share of responses that are not 5xx (0 errors when none failed)."""
    total = rate("weft_http_responses_total", sel, by)
    errors = rate("weft_http_responses_total", sel + ', status=~"5.."', by)
    return f"1 - ({errors} or {total} * 0) / {total}"


class Layout:
    """Lays panels out on Grafana's 24-column grid, top to bottom, and gives
    each the next id."""

    def __init__(self):
        self.panels = []
        self.y = 0

    def _place(self, panel, x, w, h):
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": x, "y": self.y}
        self.panels.append(panel)

    def row(self, title):
        """A row header: a section title across the grid."""
        self._place({"type": "row", "title": title, "collapsed": False, "panels": []}, 0, 24, 1)
        self.y += 1

    def line(self, height, *panels):
        """Panels side by side, sharing the width equally."""
        w = 24 // len(panels)
        for i, p in enumerate(panels):
            self._place(p, i * w, w, height)
        self.y += height


def targets(queries):
    return [
        {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
        for i, (expr, legend) in enumerate(queries)
    ]


def timeseries(title, description, queries, unit="short", stack=False, max_value=None):
    defaults = {
        "unit": unit,
        "min": 0,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stack else 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets(queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"], "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def thresholds(*steps):
    """Colour steps: (value or None for the base, colour)."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


GOOD_LOW = thresholds((None, "green"), (1, "red"))
GOOD_HIGH = thresholds((None, "red"), (0.95, "orange"), (0.99, "green"))
NEUTRAL = thresholds((None, "blue"))


def stat(title, description, expr, unit="short", colours=NEUTRAL, legend=""):
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets([(expr, legend)]),
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": colours, "color": {"mode": "thresholds"}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def bargauge(title, description, queries, unit, colours):
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets(queries),
        "fieldConfig": {
            "defaults": {"unit": unit, "min": 0, "max": 1, "thresholds": colours, "color": {"mode": "thresholds"}},
            "overrides": [],
        },
        "options": {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    }


def query_variable(name, label, query, hide=False, all_value=None):
    """A multi-value variable filled from label values, with "All"."""
    v = {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 2 if hide else 0,
        "options": [],
        "regex": "",
    }
    if all_value is not None:
        v["allValue"] = all_value
    return v


def variables(flow_metric=None):
    """The data source, the node (and its hidden Prometheus instance), and,
    for flow dashboards, the destination namespace and workload found in
    `flow_metric`."""
    out = [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "current": {"selected": True, "text": DATASOURCE_NAME, "value": DATASOURCE_UID},
            "hide": 0,
            "options": [],
            "regex": "",
            "refresh": 1,
        },
        query_variable("node", "Node", "label_values(weft_agent_info, node)"),
        # Agents' series carry Prometheus' `instance`, not the node name:
        # the node's agent_info says which instance is which node.
        query_variable("instance", "Instance", 'label_values(weft_agent_info{node=~"$node"}, instance)', hide=True),
    ]
    if flow_metric:
        # ".*" for All, so traffic with no namespace (hosts, the world) stays in.
        out.append(
            query_variable(
                "namespace",
                "Destination namespace",
                f"label_values({flow_metric}{{{NODE}}}, destination_namespace)",
                all_value=".*",
            )
        )
        out.append(
            query_variable(
                "workload",
                "Destination workload",
                f'label_values({flow_metric}{{{NODE}, destination_namespace=~"$namespace"}}, destination_workload)',
                all_value=".*",
            )
        )
    return out


def dashboard(uid, title, description, layout, flow_metric=None):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["weft"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "links": [
            {
                "type": "dashboards",
                "title": "weft",
                "tags": ["weft"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {"list": variables(flow_metric)},
        "panels": layout.panels,
    }


def network_overview():
    flows = "weft_flows_processed_total"
    drops = "weft_drop_total"
    policy = "weft_policy_verdicts_total"
    tcp = "weft_tcp_flags_total"
    g = Layout()
    g.row("At a glance")
    g.line(
        4,
        stat("Flows /s", "Flows the datapath and the proxy reported, per second.", rate(flows, DEST), "cps"),
        stat("Drops /s", "Packets the datapath dropped, per second.", rate(drops, DEST), "pps", GOOD_LOW),
        stat(
            "Policy denials /s",
            "Connections refused by network policy, per second.",
            rate(policy, DEST + ', action="dropped"'),
            "cps",
            GOOD_LOW,
        ),
        stat(
            "Events lost",
            "Flow events lost on their way to readers in the time range (details: Agent health).",
            increase_in_range("weft_lost_events_total", NODE),
            "short",
            GOOD_LOW,
        ),
    )
    g.row("Flows")
    g.line(
        8,
        timeseries(
            "Flows by type",
            "Trace points (from-endpoint, to-proxy, ...), drops, policy verdicts and L7 flows, per second.",
            [(rate(flows, DEST, "type, subtype"), "{{type}} {{subtype}}")],
            "cps",
            stack=True,
        ),
        timeseries(
            "Flows by verdict",
            "FORWARDED, REDIRECTED (to the node's Envoy), DROPPED, ... per second.",
            [(rate(flows, DEST, "verdict"), "{{verdict}}")],
            "cps",
            stack=True,
        ),
    )
    g.row("Drops")
    g.line(
        8,
        timeseries(
            "Drops by reason",
            "Dropped packets per second, by the datapath's drop reason.",
            [(rate(drops, DEST, "reason"), "{{reason}}")],
            "pps",
        ),
        timeseries(
            "Drops by namespace",
            "Dropped packets per second, by the namespace they were going to and coming from.",
            [
                (rate(drops, DEST, "destination_namespace"), "to {{destination_namespace}}"),
                (rate(drops, DEST, "source_namespace"), "from {{source_namespace}}"),
            ],
            "pps",
        ),
        timeseries(
            "Drops by workload",
            "Dropped packets per second, by the workloads at both ends and the reason.",
            [
                (
                    rate(drops, DEST, "source_workload, destination_workload, reason"),
                    "{{source_workload}} → {{destination_workload}} ({{reason}})",
                )
            ],
            "pps",
        ),
    )
    g.row("Network policy")
    g.line(
        8,
        timeseries(
            "Policy verdicts by action",
            "Policy decisions per second, by direction and action (forwarded or dropped).",
            [(rate(policy, DEST, "direction, action"), "{{direction}} {{action}}")],
            "cps",
        ),
        timeseries(
            "Policy verdicts by match",
            "Which kind of rule decided (l3, l4, l3-l4, all; none = default deny), per second.",
            [(rate(policy, DEST, "match, action"), "{{match}} {{action}}")],
            "cps",
        ),
    )
    g.row("TCP")
    syn = rate(tcp, NODE + ', flag="SYN"')
    syn_ack = rate(tcp, NODE + ', flag="SYN-ACK"')
    g.line(
        8,
        timeseries(
            "TCP flags",
            "TCP packets per second seen at trace points, by flag combination.",
            [(rate(tcp, NODE, "flag"), "{{flag}}")],
            "pps",
        ),
        timeseries(
            "SYN vs SYN-ACK",
            "Connection attempts against answers. A gap that stays open means SYNs that got no "
            "SYN-ACK: dropped or unanswered connections. A packet is counted at every trace point "
            "it passes, so read the trend of the gap rather than its size.",
            [(syn, "SYN"), (syn_ack, "SYN-ACK"), (f"clamp_min({syn} - {syn_ack}, 0)", "SYN without SYN-ACK")],
            "pps",
        ),
    )
    g.row("Loss")
    g.line(
        8,
        timeseries(
            "Lost events by source",
            "Flow events lost per second, by where: the kernel ring buffer, the agent's queue, "
            "the flow store (overwritten before read), the OTLP exporter.",
            [(rate("weft_lost_events_total", NODE, "source"), "{{source}}")],
            "cps",
        ),
    )
    return dashboard(
        "weft-network",
        "weft / Network overview",
        "Flows, drops, policy verdicts and TCP health from weft's datapath.",
        g,
        flows,
    )


def http_by(side):
    """Request rate, success rate, latency and status codes, grouped by one end."""
    ns, wl = f"{side}_namespace", f"{side}_workload"
    by = f"{ns}, {wl}"
    who = "{{" + ns + "}}/{{" + wl + "}}"
    return [
        timeseries(
            f"Request rate by {side}",
            f"HTTP requests per second through the nodes' Envoy, by {side} workload.",
            [(rate("weft_http_requests_total", DEST, by), who)],
            "reqps",
        ),
        timeseries(
            f"Success rate by {side}",
            f"Share of responses that are not 5xx, by {side} workload.",
            [(success_rate(DEST, by), who)],
            "percentunit",
            max_value=1,
        ),
        timeseries(
            f"Latency p50 / p95 / p99 by {side}",
            f"From the start of a request to the last byte of its response, by {side} workload.",
            [(quantile(q, DEST, by), f"p{round(q * 100)} {who}") for q in (0.5, 0.95, 0.99)],
            "s",
        ),
        timeseries(
            f"Status codes by {side}",
            f"Responses per second by HTTP status, by {side} workload.",
            [(rate("weft_http_responses_total", DEST, f"{by}, status"), who + " {{status}}")],
            "reqps",
            stack=True,
        ),
    ]


def l7_http():
    requests = "weft_http_requests_total"
    errors = DEST + ', status=~"5.."'
    g = Layout()
    g.row("At a glance")
    g.line(
        4,
        stat("Requests /s", "HTTP requests per second to the selected workloads.", rate(requests, DEST), "reqps"),
        stat("Success rate", "Share of responses that are not 5xx.", success_rate(DEST), "percentunit", GOOD_HIGH),
        stat("Latency p95", "95th percentile of request duration.", quantile(0.95, DEST, None), "s"),
        stat("5xx /s", "Server errors per second.", rate("weft_http_responses_total", errors), "reqps", GOOD_LOW),
    )
    for side, title in [("destination", "the service called"), ("source", "the caller")]:
        g.row(f"By {side} workload ({title})")
        rate_, success, latency, codes = http_by(side)
        g.line(8, rate_, success)
        g.line(8, latency, codes)
    return dashboard(
        "weft-http",
        "weft / L7 HTTP",
        "HTTP traffic through the nodes' shared Envoy: rate, errors and latency per workload.",
        g,
        requests,
    )


def agent_health():
    fill = f"weft_flow_store_flows{{{NODE}}} / weft_flow_store_capacity{{{NODE}}}"
    g = Layout()
    g.row("At a glance")
    g.line(
        4,
        stat(
            "Agents not ready",
            "Agents whose datapath or Envoy is not ready.",
            f"sum(1 - weft_agent_ready{{{NODE}}})",
            "short",
            GOOD_LOW,
        ),
        stat(
            "Envoys not ready",
            "Nodes whose Envoy is not running with its configuration.",
            f"sum(1 - weft_envoy_ready{{{NODE}}})",
            "short",
            GOOD_LOW,
        ),
        stat(
            "xDS NACKs",
            "Configuration updates Envoy refused in the time range.",
            increase_in_range("weft_xds_nacks_total", NODE),
            "short",
            GOOD_LOW,
        ),
        stat(
            "Envoy restarts",
            "Times agents restarted their Envoy in the time range.",
            increase_in_range("weft_envoy_restarts_total", NODE),
            "short",
            GOOD_LOW,
        ),
        stat(
            "Events lost",
            "Flow events lost in the time range, all sources.",
            increase_in_range("weft_lost_events_total", NODE),
            "short",
            GOOD_LOW,
        ),
        stat(
            "Flow store fill",
            "The fullest node's flow store (a ring: full is normal once traffic flows).",
            f"max({fill})",
            "percentunit",
        ),
    )
    g.row("Flow pipeline")
    g.line(
        8,
        timeseries(
            "Events read",
            "Datapath records read from the ring buffer, Envoy access-log entries received, and "
            "flows stored, per second and node.",
            [
                (per_node(f"rate(weft_events_read_total{{{NODE}}}[{RATE}])"), "{{node}} datapath records"),
                (per_node(f"rate(weft_access_log_entries_total{{{NODE}}}[{RATE}])"), "{{node}} access-log entries"),
                (per_node(f"rate(weft_flows_stored_total{{{NODE}}}[{RATE}])"), "{{node}} flows stored"),
            ],
            "cps",
        ),
        timeseries(
            "Lost events by source",
            "Events lost per second: kernel ring buffer full, agent queue full, flow store "
            "overwritten before read, OTLP exporter behind.",
            [(rate("weft_lost_events_total", NODE, "source"), "{{source}}")],
            "cps",
        ),
        timeseries(
            "Flow store fill",
            "Flows held over capacity, per node.",
            [(per_node(fill), "{{node}}")],
            "percentunit",
            max_value=1,
        ),
    )
    g.row("Datapath maps")
    g.line(
        8,
        bargauge(
            "Map occupancy",
            "Entries over capacity of each eBPF map, on the fullest node.",
            [(f"max by (map) (weft_datapath_map_entries{{{NODE}}} / weft_datapath_map_capacity{{{NODE}}})", "{{map}}")],
            "percentunit",
            thresholds((None, "green"), (0.8, "orange"), (0.95, "red")),
        ),
        timeseries(
            "Map entries",
            "Entries in each eBPF map, all selected nodes.",
            [(f"sum by (map) (weft_datapath_map_entries{{{NODE}}})", "{{map}}")],
        ),
    )
    g.row("Envoy and xDS")
    g.line(
        8,
        timeseries(
            "xDS pushes, ACKs and NACKs",
            "Configuration snapshots published to the nodes' Envoys, and Envoy's answers, per second.",
            [
                (rate("weft_xds_pushes_total", NODE), "pushes"),
                (rate("weft_xds_acks_total", NODE), "ACKs"),
                (rate("weft_xds_nacks_total", NODE), "NACKs"),
            ],
            "ops",
        ),
        timeseries(
            "Envoy restarts",
            "Times each node's agent restarted its Envoy.",
            [(per_node(f"increase(weft_envoy_restarts_total{{{NODE}}}[{RATE}])"), "{{node}}")],
        ),
        timeseries(
            "Config objects by state",
            "EnvoyConfig objects: valid or rejected by validation; acknowledged, NACKed, pending "
            "or not applied by Envoy.",
            [(f"sum by (state) (weft_config_objects{{{NODE}}})", "{{state}}")],
        ),
    )
    g.row("Resources")
    g.line(
        8,
        timeseries(
            "Agent CPU",
            "CPU time of each agent process (100% = one core).",
            [(per_node(f"rate(weft_agent_cpu_seconds_total{{{NODE}}}[{RATE}])"), "{{node}}")],
            "percentunit",
        ),
        timeseries(
            "Agent memory",
            "Resident memory of each agent process.",
            [(per_node(f"weft_agent_resident_memory_bytes{{{NODE}}}"), "{{node}}")],
            "bytes",
        ),
    )
    return dashboard(
        "weft-agent",
        "weft / Agent health",
        "The agents themselves: flow pipeline, eBPF maps, Envoy and xDS, CPU and memory.",
        g,
    )


DASHBOARDS = {
    "weft-network.json": network_overview,
    "weft-http.json": l7_http,
    "weft-agent.json": agent_health,
}


def render(build):
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv):
    check = argv[1:] == ["--check"]
    if argv[1:] and not check:
        sys.exit(__doc__)
    stale = []
    for name, build in DASHBOARDS.items():
        path = HERE / name
        text = render(build)
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        sys.exit(
            f"dashboards differ from dashboards/generate.py: {', '.join(stale)}; "
            "run `python3 dashboards/generate.py` and commit the result"
        )


if __name__ == "__main__":
    main(sys.argv)
