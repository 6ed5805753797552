"""One process of the A/B: the Table 6 run's GAL (θC from the first epoch), CE
and GAL again, each after one untimed dry run, from the checkout in argv[1]."""

import json
import os
import shutil
import sys
import tempfile


def main(root, extra_flags):
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import performance

    performance.FLAGS(["performance"] + extra_flags)
    settings = performance.settings_from_flags()
    directory = tempfile.mkdtemp()
    data = performance.table6_dataset(directory, settings)

    def config(method, name, dry_run=False):
        run_dir = os.path.join(directory, name)
        return performance.table6_config(settings, method, data, run_dir, dry_run)

    for method in ("gal", "ce"):
        performance.timed_run(config(method, f"{method}-dry", dry_run=True))
    out = {}
    for i, method in enumerate(("gal", "ce", "gal")):
        wall, summary = performance.timed_run(config(method, f"{method}-{i}"))
        out.setdefault(method, []).append((wall, summary["seconds_per_epoch"]))
    shutil.rmtree(directory, ignore_errors=True)
    print("RESULT", json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
