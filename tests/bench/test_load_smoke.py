"""The load benchmark (bench/load.py) still runs end to end: a second per measurement, 8
connections, 20 event streams and a tiny checkpoint up, through an RTN job and down again, on
PostgreSQL + Redis (about a minute). Its numbers are not checked here, only that it measured
everything and printed its table."""

import json


def test_the_table_is_printed(tmp_path, capsys):
    from bench import load

    report = load.main(["--quick", "--json", str(tmp_path / "report.json")])

    assert json.loads((tmp_path / "report.json").read_text())["reads"] == report["reads"]
    names = {run["name"].split(" ")[0] for run in report["reads"]}
    assert names == {"no-op", "status", "list"}
    assert all(run["ok"] > 0 for run in report["reads"])
    assert report["streams"]["stream_statuses"] == {200: 20}
    transfers = report["transfers"]
    assert transfers["upload_bytes"] > 0 and transfers["download_bytes"] > 0
    assert transfers["upload_rss_peak"] >= transfers["upload_rss_before"] > 0
    table = capsys.readouterr().out
    for row in ("| status reads @ 8 conn", "| list reads @ 8 conn", "streams open", "| upload ", "| download ",
                "API peak RSS during the upload"):
        assert row in table
