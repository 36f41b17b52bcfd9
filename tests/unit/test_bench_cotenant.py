"""bench/cotenant_bench.py's arithmetic and table: medians per system and load, the share lost
beside the burner, one table row per system."""

from __future__ import annotations

from bench.cotenant_bench import markdown_table, summarise


def test_summarise_takes_medians_and_the_share_lost():
    samples = {
        "pool": {"alone": [300.0, 320.0, 310.0], "burner": [290.0, 280.0, 300.0]},
        "openmp": {"alone": [300.0, 300.0, 300.0], "burner": [270.0, 240.0, 250.0]},
    }
    rows = summarise(samples, burn_share=0.05)
    pool, openmp = rows
    assert (pool["system"], pool["alone_tok_s"], pool["burner_tok_s"]) == ("pool", 310.0, 290.0)
    assert pool["loss_pct"] == 6.5  # 1 - 290 / 310
    assert (openmp["burner_tok_s"], openmp["loss_pct"]) == (250.0, 16.7)
    assert openmp["burner_share_pct"] == 5.0


def test_the_table_has_a_row_per_system():
    rows = summarise({"pool": {"alone": [200.0], "burner": [150.0]}}, burn_share=0.1)
    table = markdown_table(rows, "bf16, mixed-32")
    assert table.startswith("bf16, mixed-32\n")
    assert "| pool | 200.0 | 150.0 | 25.0 % | 10.0 % |" in table
