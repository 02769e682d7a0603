"""Run every benchmark in one go (``make bench``); each records its entry in bench/results.json."""

from __future__ import annotations

import json

from bench import (
    bench_audit_page,
    bench_dag_overhead,
    bench_export,
    bench_network,
    bench_release,
    bench_scale_10k,
    bench_small_series,
)
from bench.results import RESULTS_PATH

# scale_10k last: about 2.5 hours on 2 cores (a 1,000-AN and a 10,000-AN hospital, two contenders each)
BENCHMARKS = (
    bench_export,
    bench_release,
    bench_dag_overhead,
    bench_network,
    bench_small_series,
    bench_audit_page,
    bench_scale_10k,
)


def main() -> None:
    for module in BENCHMARKS:
        print(f"== {module.__name__}", flush=True)
        module.main([])
    print(f"\n{'name':<22}{'unit':<32}{'pacsflow':>12}{'reference':>12}{'ratio':>8}")
    for entry in json.loads(RESULTS_PATH.read_text()):
        print(
            f"{entry['name']:<22}{entry['unit']:<32}{entry['pacsflow']:>12}{entry['reference']:>12}{entry['ratio']:>8}"
        )


if __name__ == "__main__":
    main()
