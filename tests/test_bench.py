"""The benchmark tool runs end to end at tiny sizes: every target it can reach in
the test session, and the three outputs. Its timings are not checked here."""

import json

from bench.__main__ import main
from bench.report import NOTES_MARKER


def test_bench_measures_every_path_and_writes_its_report(base_url, tiny_models, tmp_path):
    notes = "\nWhat limits single-stream speed: kept across runs.\n"
    (tmp_path / "BENCHMARKS.md").write_text("old table\n" + NOTES_MARKER + notes)
    main(["--model", str(tiny_models["tiny-chat"]), "--url", base_url, "--api-path", "/tiny-chat",
          "--page-path", "/tiny-page", "--no-start", "--concurrency", "1", "2", "--max-tokens", "16",
          "--out", str(tmp_path)])

    run = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    assert set(run["results"]) == {"engine", "transformers", "http", "openai", "page"}
    assert "llamacpp" in run["skipped"] or "llamacpp" in run["results"]
    for target, levels in run["results"].items():
        assert [level["concurrency"] for level in levels] == [1, 2], target
        for level in levels:
            assert level["errors"] == 0, (target, level["error_examples"])
            assert level["requests"] == level["concurrency"]
            assert level["output_tokens"] > 0 and level["aggregate_tok_s"] > 0, target
            assert 0 < level["ttft_p50_ms"] <= level["ttft_p95_ms"], target

    assert (tmp_path / "benchmarks" / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Targets" in markdown and "| 2 |" in markdown and run["machine"]["cpu"] in markdown
    assert "old table" not in markdown and markdown.endswith(notes)
