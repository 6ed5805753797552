#!/bin/bash
# Alternate the two commits' processes, three each.
cd /work/bench/ab
for r in 1 2 3; do
  for c in old new; do
    echo "== $c round $r" >> ab.log
    PYTHONPATH=/work/bench/ab/$c /work/venv/bin/python ab_one.py /work/bench/ab/$c 2>/dev/null | grep RESULT >> ab.log
  done
done
echo DONE >> ab.log
