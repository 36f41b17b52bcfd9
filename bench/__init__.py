"""Benchmarks: fixed workloads (`bench.workloads`) and the measurements run on them (`bench.bar`:
issue 4's performance bar in one command; `bench.engine_bench`: the in-process engine against
transformers static batching). Every result is a JSON file plus a markdown table; see
bench/README.md."""
