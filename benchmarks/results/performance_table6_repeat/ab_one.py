"""One process: table6's GAL (θC from the first epoch) and CE runs, each timed after a dry run."""
import json, os, sys, tempfile, shutil
root = sys.argv[1]
sys.path.insert(0, root); sys.path.insert(0, os.path.join(root, "benchmarks"))
import performance as P
P.FLAGS(["performance"] + sys.argv[2:])
s = P.settings_from_flags()
d = tempfile.mkdtemp()
data = P.table6_dataset(d, s)
out = {}
for m in ("gal", "ce"):
    P.timed_run(P.table6_config(s, m, data, os.path.join(d, m + "-dry"), dry_run=True))
for m in ("gal", "ce", "gal"):
    w, summ = P.timed_run(P.table6_config(s, m, data, os.path.join(d, m + str(len(out)))))
    out.setdefault(m, []).append((w, summ["seconds_per_epoch"]))
shutil.rmtree(d, ignore_errors=True)
print("RESULT", json.dumps(out))
