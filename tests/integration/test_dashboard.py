"""deploy/grafana-dashboard.json, read without Grafana: every expression
parses as PromQL and reads only the series and labels of the metrics
contract (the usage issue). Whether each series exists in a real
/stats/prometheus scrape is for a test with traffic (dashboard.series())."""

import dashboard

CONTRACT = {
    "azure_openai_requests_total": {"caller", "model", "upstream", "deployment", "operation", "status"},
    "azure_openai_tokens_total": {"caller", "model", "upstream", "deployment", "type"},
    "azure_openai_request_duration_ms_bucket": {"caller", "model", "deployment", "le"},
    "azure_openai_time_to_first_byte_ms_bucket": {"caller", "model", "deployment", "le"},
    "azure_openai_ratelimit_remaining_requests": {"upstream", "deployment"},
    "azure_openai_ratelimit_remaining_tokens": {"upstream", "deployment"},
}


def test_dashboard_reads_the_whole_contract_and_nothing_else():
    series = dashboard.series()
    assert set(series) == set(CONTRACT)
    for name, labels in series.items():
        assert labels <= CONTRACT[name], (name, labels - CONTRACT[name])


def test_every_expression_parses():
    exprs = dashboard.expressions()
    assert len(exprs) > 20
    for place, expr in exprs:
        assert dashboard.parse(expr), place


def test_quantiles_come_from_histogram_buckets():
    exprs = [e for _, e in dashboard.expressions() if "histogram_quantile" in e]
    assert len(exprs) >= 4
    assert all("_bucket{" in e and "by (le" in e for e in exprs), exprs


def test_datasource_is_a_variable_used_everywhere():
    board = dashboard.load()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard._panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_the_helper_finds_what_a_query_reads():
    parsed = dashboard.parse('sum by (caller) (rate(x_total{model=~"$model"}[$__rate_interval])) / sum(y)')
    assert parsed == [("x_total", {"caller", "model"}), ("y", set())]
    assert dashboard.parse("label_values(z_total, caller)") == [("z_total", {"caller"})]
