"""What deploy/grafana-dashboard.json queries: every PromQL expression in it
(panel targets and template variables), and the series and labels those
expressions read, found with a real PromQL parser (promql-parser, PyPI).

    from dashboard import series
    for name, labels in series().items(): ...  # assert each in /stats/prometheus

Grafana's variables are replaced by plain values first ($__rate_interval by
5m, $__range by 1h, $caller and the like by .*)."""

import json
import re
from pathlib import Path

import promql_parser

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
LABEL_VALUES = re.compile(r"^label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)$")


def load(path=DASHBOARD):
    return json.loads(Path(path).read_text())


def _panels(panels):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def expressions(dashboard=None):
    """Every PromQL expression, with where it is: [(place, expr)]."""
    dashboard = dashboard or load()
    out = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            out.append((f"variable {variable['name']}", query))
    return out


def substitute(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def parse(expr):
    """The selectors in one expression: [(metric, {labels used})]. Labels
    are those matched in the selector and those an aggregation groups by."""
    expr = substitute(expr)
    match = LABEL_VALUES.match(expr)
    if match:
        return [(match.group(1), {match.group(2)})]
    found = []

    def visit(node, grouping):
        kind = type(node).__name__
        if kind == "VectorSelector":
            labels = {m.name for m in node.matchers.matchers} - {"__name__"}
            found.append((node.name, labels | grouping))
        elif kind == "MatrixSelector":
            visit(node.vector_selector, grouping)
        elif kind == "AggregateExpr":
            # Labels an aggregation groups by must be on the series below it.
            labels = set(node.modifier.labels) if node.modifier is not None else set()
            visit(node.expr, grouping | labels)
        elif kind == "BinaryExpr":
            visit(node.lhs, grouping)
            visit(node.rhs, grouping)
        elif kind == "Call":
            for arg in node.args:
                visit(arg, grouping)
        elif kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
            visit(node.expr, grouping)
    visit(promql_parser.parse(expr), set())
    return found


def series(dashboard=None):
    """{series name: labels the dashboard reads from it}: what a
    /stats/prometheus scrape must show for the dashboard to work."""
    out = {}
    for _, expr in expressions(dashboard):
        for name, labels in parse(expr):
            out.setdefault(name, set()).update(labels)
    return out
