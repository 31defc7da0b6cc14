"""The cost of tracing end to end, from one peer-bench run whose project starts took turns (bench/tracing_modes.sh).

    python -m bench.tracing_e2e RUN_DIR [--log var/tracing-modes.log] [--label aethercore]

RUN_DIR is the run's output folder ($TMPDIR/peer-bench/<timestamp>): its loadgen.jsonl holds the project's points in
the order they ran, one group of CONCS per start; the log names each start's mode. Prints, per mode and concurrency,
throughput and server CPU per request (median over the starts of that mode, range) and both against `off`, with the
peers of the same run (Ray Serve) for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--log", default="var/tracing-modes.log")
    parser.add_argument("--label", default="aethercore")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (Path(args.run) / "loadgen.jsonl").read_text().splitlines() if line.strip()]
    ours = [row for row in rows if row["label"] == args.label]
    starts = [line.split()[-1] for line in Path(args.log).read_text().splitlines() if " mode " in line]
    starts = starts[-(len(ours) // max(1, len({r["concurrency"] for r in ours}))) :]  # this run's starts
    concs = sorted({row["concurrency"] for row in ours})
    per_start = len(concs)
    if len(ours) != per_start * len(starts):
        raise SystemExit(f"{len(ours)} points for {len(starts)} starts of {per_start} concurrencies: not one run")
    table: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for index, row in enumerate(ours):
        table[(starts[index // per_start], row["concurrency"])].append(row)
    modes = list(dict.fromkeys(starts))

    def median(mode: str, conc: int, key: str) -> float:
        return statistics.median(float(r[key]) for r in table[(mode, conc)])

    def spread(mode: str, conc: int, key: str) -> str:
        values = [float(r[key]) for r in table[(mode, conc)]]
        return f"{statistics.median(values):.1f}" + (
            f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
        )

    print("| mode | C | req/s (range) | vs off | server CPU ms/req (range) | vs off | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for conc in concs:
        for mode in modes:
            rps, cpu = median(mode, conc, "throughput_rps"), median(mode, conc, "server_cpu_ms_per_req")
            base_rps, base_cpu = median("off", conc, "throughput_rps"), median("off", conc, "server_cpu_ms_per_req")
            print(
                f"| {mode} | {conc} | {spread(mode, conc, 'throughput_rps')} | {(rps / base_rps - 1) * 100:+.1f} % | "
                f"{spread(mode, conc, 'server_cpu_ms_per_req')} | {(cpu / base_cpu - 1) * 100:+.1f} % | "
                f"{median(mode, conc, 'p99_ms'):.1f} |"
            )
    for row in rows:
        if row["label"] != args.label:
            print(
                f"peer {row['label']} C={row['concurrency']}: {row['throughput_rps']} req/s, "
                f"{row.get('server_cpu_ms_per_req', '')} ms CPU/req"
            )


if __name__ == "__main__":
    main()
