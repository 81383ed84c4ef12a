"""Smoke tests of the capture and sweep benchmarks (python -m vitlens.bench [--sweep]) on a tiny model."""
from __future__ import annotations

from vitlens.bench import BenchRow, format_table, main


def test_bench_runs_on_a_tiny_model(capsys):
    assert main(["--device", "cpu", "--models", "test_vit", "--sizes", "32", "64", "--repeats", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("device cpu")
    assert "capture/plain" in out[1] and "hit ms" in out[1] and "sweep/plain" in out[1]
    rows = [line.split() for line in out[3:]]
    assert [(row[0], row[1], row[3], row[4]) for row in rows] == [("test_vit", "32", "fp32", "5"), ("test_vit", "64", "fp32", "17")]
    for row in rows:
        plain, captured, hit, swept = float(row[5]), float(row[6]), float(row[9]), float(row[12])
        assert plain > 0 and captured > 0 and 0 < hit < 1000 and swept > 0


def test_misses_are_flagged():
    row = BenchRow(model="m", size=518, batch=8, tokens=1374, plain_ms=10.0, capture_ms=12.0, best_ratio=1.2,
                   hit_ms=60.0, trace_kb=800.0)
    assert row.ratio == 1.2 and row.images_per_s == 1000 / 12
    assert row.misses() == ["capture > 1.10x plain", "cache hit >= 50 ms"]
    ok = BenchRow(model="m", size=224, batch=1, tokens=257, plain_ms=10.0, capture_ms=10.5, best_ratio=1.0,
                  hit_ms=1.0, trace_kb=80.0)
    assert ok.misses() == []
    assert format_table([row, ok]).splitlines()[-1].endswith("-")


def test_sweep_bench_compares_a_sweep_with_plain_forward(capsys):
    assert main(["--sweep", "--device", "cpu", "--models", "test_vit", "--sizes", "32", "--batch", "4",
                 "--images", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "sweep/plain" in out[1]
    name, size, batch, precision, images, plain, swept, ratio = out[3].split()[:8]
    assert (name, size, batch, precision, images) == ("test_vit", "32", "4", "fp32", "8")
    assert float(plain) > 0 and float(swept) > 0 and abs(float(ratio[:-1]) - float(swept) / float(plain)) < 0.01
