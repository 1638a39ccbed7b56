"""The false-alarm command (equivalence/false_alarms.py) runs every built-in implementation of every
family, and attributes each drawn example to its family."""

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
