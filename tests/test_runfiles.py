"""Run files: the wall-clock phases in run.json."""
import subprocess
import sys


def test_phase_timing_starts_when_lorakd_starts(tmp_path):
    """phases_s.start counts from lorakd's import, not from the process's start: 2 s spent before it (as a
    shell's `pip install ... &&` would) are not in it."""
    code = ("import time\nt0 = time.perf_counter()\ntime.sleep(2)\nt1 = time.perf_counter()\nimport lorakd\n"
            "from lorakd.runfiles import Phases\nstart = Phases().s['start']\nt2 = time.perf_counter()\n"
            "print(start, t2 - t1)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    start, since_import = map(float, out.split())
    assert since_import - 0.5 < start <= since_import  # /proc's process age would be over 2 s
