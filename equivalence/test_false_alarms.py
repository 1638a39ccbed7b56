"""The false-alarm command (equivalence/false_alarms.py) runs every built-in implementation of every
family, attributes each drawn example to its family, and keeps what an interrupted round drew."""

import json
import os
import signal
import sys
import threading
import time

import impls

from . import false_alarms


def test_every_family_and_implementation_is_selected():
    cmd = false_alarms.pytest_command(7, "dev", 2, ["equivalence/test_values.py"], [])
    chosen = {(a, b) for a, b in zip(cmd, cmd[1:])}
    for f in impls.FAMILIES.values():
        for name in impls.names(family=f.name):
            assert (f.option, name) in chosen, f"{f.name}: {name} not run ({f.option} {name} missing)"
    assert ("--hypothesis-seed", "7") in chosen


def test_each_example_is_counted_for_its_family():
    assert false_alarms.family("equivalence/test_values.py::test_values_and_last_state[ssd-triton]") == "ssd"
    assert false_alarms.family("equivalence/mamba3/test_spec.py::test_x[chunked]") == "mamba3"
    assert false_alarms.family("equivalence/test_parallel.py::test_x[parallel]") == "selective"
    # a file's own family mark outranks its folder, and a top-level file's default
    assert false_alarms.family("equivalence/mamba3/test_mimo.py::test_matches_float64_loop[chunked]") == "mamba3_mimo"
    assert false_alarms.family("equivalence/test_ssd_front_door.py::test_x") == "ssd"
    assert false_alarms.family("equivalence/test_model2.py::test_x[2]") == "ssd"
    assert false_alarms.file_family("equivalence/test_parallel.py") is None       # only_for is not a family
    assert false_alarms.file_family("equivalence/no_such_file.py") is None
    assert false_alarms.split("equivalence/test_values.py::test_values_and_last_state[mamba3-recurrent]") == (
        "test_values_and_last_state", "recurrent")


def test_an_interrupted_round_is_counted_and_written(tmp_path, monkeypatch):
    """SIGTERM in the middle of a round (a thorough run stopped after hours): the examples drawn so
    far are counted and the round is written, marked interrupted, instead of lost with its folder."""
    ready = tmp_path / "ready"
    drawn = dict(type="test_case", status="passed", features={"target:y": 0.25},
                 property="equivalence/test_values.py::test_values_and_last_state[ssd-loop]")
    child = ("import json, os, pathlib, time; d = pathlib.Path(os.environ['HYPOTHESIS_STORAGE_DIRECTORY'], 'observed'); "
             f"d.mkdir(parents=True); (d / 'a_testcases.jsonl').write_text(json.dumps({drawn!r}) + '\\n'); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)")
    monkeypatch.setattr(false_alarms, "pytest_command", lambda *args: [sys.executable, "-c", child])

    def terminate_when_drawn():
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=terminate_when_drawn, daemon=True).start()
    out = tmp_path / "rounds.jsonl"
    started = time.monotonic()
    assert false_alarms.main(["--rounds", "3", "--out", str(out)]) == 0
    assert time.monotonic() - started < 60
    (line,) = out.read_text().splitlines()
    written = json.loads(line)
    assert written["interrupted"] and written["examples"] == {"ssd": 1}
    assert written["margins"] == [["ssd", "loop", "test_values_and_last_state", "y", 0.25]]
