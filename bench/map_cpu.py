"""A 10,000-item ``.map`` of a trivial function on a fresh platform: items/s and the gateway's CPU per item.

    python bench/map_cpu.py [--items 10000] [--repeat 3]

The gateway's CPU seconds (``/proc/PID/stat``) over the map, divided by its items, is the figure that
survives a loaded machine; the wall-clock rate is printed beside it. Each repeat is a map of its own
on the same warm platform (the first one's workers are started before it is timed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from harness import PRODUCT_DEFAULTS, cpu_seconds, tree_cpu_seconds  # noqa: E402
from profile_gateway import record, stop  # noqa: E402

CODE = """from opbox import operator


@operator()
def ident(i):
    return i
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="py-spy the gateway during the last map: collapsed stacks "
                        "in this file (`python bench/profile_gateway.py --summarize FILE` reads them)")
    args = parser.parse_args()
    from platform_fixture import running_platform

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "map_cpu_fns.py").write_text(CODE)
        sys.path.insert(0, str(code))
        import map_cpu_fns

        with running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
            ident = map_cpu_fns.ident.deploy(client=plat.client(), quiet=True)
            ident.map(range(200), progress=False)  # the pool's workers are up
            pid, items = plat.proc.pid, list(range(args.items))
            for n in range(args.repeat):
                spy = record(pid, args.profile, 250) if args.profile and n == args.repeat - 1 else None
                cpu, workers, client, t = cpu_seconds(pid), tree_cpu_seconds(pid), time.process_time(), time.perf_counter()
                assert ident.map(items, progress=False) == items
                took, used = time.perf_counter() - t, cpu_seconds(pid) - cpu
                workers, client = tree_cpu_seconds(pid) - workers, time.process_time() - client
                if spy is not None:
                    stop(spy)
                print(json.dumps({"items": args.items, "items_per_s": round(args.items / took, 1),
                                  "gateway_cpu_us_per_item": round(used / args.items * 1e6, 1),
                                  "workers_cpu_us_per_item": round(workers / args.items * 1e6, 1),
                                  "client_cpu_us_per_item": round(client / args.items * 1e6, 1),
                                  "load": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
