"""Profile tests: location, keys, lookup by plan() and conv2d, bad and stale files, writers."""

import json
import logging
import multiprocessing
import os
import time

import numpy as np
import pytest

import pyconvmpi
from pyconvmpi import layers, profile
from pyconvmpi._validate import geometry
from pyconvmpi.plan import Plan


@pytest.fixture
def profile_path(tmp_path, monkeypatch):
    """A profile file under tmp_path that lookup() uses, outside any MPI launcher."""
    path = tmp_path / "cache" / "profile.json"
    monkeypatch.setenv(profile.ENV_VAR, str(path))
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    profile.reload()
    return path


def geo_of(text):
    layer = layers.parse_shape(text)
    return geometry(layer.input_shape, layer.weight_shape, fn="test", **layer.options())


LAYER = "2x8x16x16:16x3x3:p1"
TUNED = Plan(threads=1, algorithm="direct", block_k=4)


def entry(text=LAYER, direction="forward", plan=TUNED, comm_size=1, per_node=1,
          dtype="float32", **key_changes):
    key = profile.key_dict(geo_of(text), direction, dtype, comm_size, per_node)
    key.update(key_changes)
    return profile.make_entry(key, plan, 1e-3, Plan(), 2e-3, layer=text)


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == "pyconvmpi.profile" and r.levelno == logging.WARNING]


def test_default_path_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(profile.ENV_VAR, str(tmp_path / "p.json"))
    assert profile.default_path() == tmp_path / "p.json"


def test_default_path_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv(profile.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert profile.default_path() == tmp_path / "pyconvmpi" / "profile.json"


def test_default_path_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(profile.ENV_VAR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert profile.default_path() == tmp_path / ".cache" / "pyconvmpi" / "profile.json"


def test_key_holds_machine_and_library():
    key = profile.key_dict(geo_of("2x8x16x16:16x3x3:s2:p1:g2"), "backward_data", "float64", 4, 2)
    assert key["direction"] == "backward_data"
    assert key["input"] == [2, 8, 16, 16]
    assert key["weight"] == [16, 4, 3, 3]
    assert key["stride"] == [2, 2]
    assert key["padding"] == [1, 1, 1, 1]
    assert key["groups"] == 2
    assert key["dtype"] == "float64"
    assert (key["comm_size"], key["ranks_per_node"]) == (4, 2)
    assert set(key["hardware"]) == {"cpu", "simd", "cores"}
    assert key["version"] == pyconvmpi.__version__
    assert key["abi"] == pyconvmpi._lib.ABI_VERSION


def test_key_rejects_unknown_direction():
    with pytest.raises(ValueError, match="direction must be one of"):
        profile.key_dict(geo_of(LAYER), "sideways", "float32", 1, 1)


def test_lookup_without_file_returns_none(profile_path):
    assert profile.lookup(geo_of(LAYER), "forward", "float32") is None


def test_plan_uses_profile_entry(profile_path):
    profile.update([entry()])
    chosen = pyconvmpi.plan((2, 8, 16, 16), (16, 8, 3, 3), padding=1)
    assert chosen.source == "profile"
    assert (chosen.threads, chosen.algorithm, chosen.block_k) == (1, "direct", 4)
    other = pyconvmpi.plan((2, 8, 16, 16), (16, 8, 3, 3), padding=1, dtype="float64")
    assert other.source == "heuristic"
    backward = pyconvmpi.plan((2, 8, 16, 16), (16, 8, 3, 3), padding=1, op="backward")
    assert backward.source == "heuristic"


def test_plan_local_call_uses_launcher_ranks_per_node(profile_path, monkeypatch):
    profile.update([entry(per_node=2, plan=Plan(threads=1, algorithm="auto"))])
    assert pyconvmpi.plan((2, 8, 16, 16), (16, 8, 3, 3), padding=1).source == "heuristic"
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    assert pyconvmpi.plan((2, 8, 16, 16), (16, 8, 3, 3), padding=1).source == "profile"


def test_conv2d_uses_profile_entry(profile_path, monkeypatch):
    profile.update([entry(), entry(direction="backward", plan=Plan(threads=1))])
    returned = []
    real_lookup = profile.lookup

    def recording_lookup(*args, **kwargs):
        plan = real_lookup(*args, **kwargs)
        returned.append(plan)
        return plan

    monkeypatch.setattr(profile, "lookup", recording_lookup)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 16, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    tuned = pyconvmpi.conv2d(x, w, padding=1)
    grads = pyconvmpi.conv2d_backward(np.ones_like(tuned), x, w, padding=1)
    assert [p.source for p in returned] == ["profile", "profile"]
    expected = pyconvmpi.conv2d(x, w, padding=1, plan=Plan(algorithm="reference"))
    np.testing.assert_allclose(tuned, expected, rtol=1e-5, atol=1e-5)
    assert grads.weight.shape == w.shape


def test_lookup_reloads_changed_file(profile_path):
    profile.update([entry()])
    assert profile.lookup(geo_of(LAYER), "forward", "float32").block_k == 4
    profile.update([entry(plan=Plan(threads=1, algorithm="direct", block_k=8))])
    assert profile.lookup(geo_of(LAYER), "forward", "float32").block_k == 8
    profile.clear()
    assert profile.lookup(geo_of(LAYER), "forward", "float32") is None


def test_lookup_disabled_inside_block(profile_path):
    profile.update([entry()])
    with profile.disabled():
        assert profile.lookup(geo_of(LAYER), "forward", "float32") is None
    assert profile.lookup(geo_of(LAYER), "forward", "float32") is not None


def test_lookup_key_includes_communicator(profile_path):
    profile.update([entry(comm_size=2, per_node=2, plan=Plan(strategy="rows", active_ranks=2,
                                                              threads=1))])
    geo = geo_of(LAYER)
    assert profile.lookup(geo, "forward", "float32", 2, 2).strategy == "rows"
    assert profile.lookup(geo, "forward", "float32", 2, 1) is None
    assert profile.lookup(geo, "forward", "float32", 4, 2) is None
    assert profile.lookup(geo, "forward", "float32") is None


@pytest.mark.parametrize("content, reason", [
    ("{\"schema\": \"pyconvmpi-profile\", \"schema_vers", "not valid JSON"),
    ("\x00\x01garbage", "not valid JSON"),
    ("{\"schema\": \"other-tool\", \"entries\": {}}", "not a pyconvmpi profile"),
    ("[1, 2, 3]", "not a pyconvmpi profile"),
    ("{\"schema\": \"pyconvmpi-profile\", \"schema_version\": 99, \"entries\": {}}",
     "schema version 99"),
    ("{\"schema\": \"pyconvmpi-profile\", \"schema_version\": 1, \"entries\": []}",
     "no 'entries' object"),
])
def test_unusable_file_warns_once_and_uses_heuristic(profile_path, caplog, content, reason):
    profile_path.parent.mkdir(parents=True)
    profile_path.write_text(content)
    caplog.set_level(logging.WARNING, logger="pyconvmpi")
    for _ in range(3):
        assert profile.lookup(geo_of(LAYER), "forward", "float32") is None
    assert pyconvmpi.plan((2, 8, 16, 16), (16, 8, 3, 3), padding=1).source == "heuristic"
    found = warnings_of(caplog)
    assert len(found) == 1
    assert reason in found[0].getMessage()


def test_stale_entries_skipped_with_one_warning(profile_path, caplog):
    foreign = dict(profile.hardware_fingerprint(), cpu="Some Other CPU")
    stale = [
        entry("2x8x16x16:16x3x3", hardware=foreign),
        entry("2x8x16x16:16x3x3:p2", plan=Plan(threads=1, algorithm="direct", block_k=32)),
        entry("2x8x16x16:16x3x3:p3", comm_size=2,
              plan=Plan(strategy="batch", active_ranks=4, threads=1)),
        entry("2x8x16x16:16x3x3:p4", version="0.0.0"),
        entry("2x8x16x16:16x3x3:s2", plan=Plan(threads=4096)),
    ]
    good = entry()
    profile.update(stale + [good])
    caplog.set_level(logging.WARNING, logger="pyconvmpi")
    assert profile.lookup(geo_of(LAYER), "forward", "float32") == Plan.from_dict(
        good["plan"], source="profile")
    for item in stale:
        text = item["layer"]
        assert profile.lookup(geo_of(text), "forward", "float32", item["key"]["comm_size"]) is None
    found = warnings_of(caplog)
    assert len(found) == 1
    message = found[0].getMessage()
    assert "skipped 5 of 6 entries" in message
    assert "recorded on other hardware" in message
    assert "block_k=32 exceeds the layer's 16 output channels per group" in message
    assert "active_ranks=4 exceeds the communicator size 2" in message
    assert "another library version" in message
    assert "oversubscribes" in message


def test_entry_problem_flags_unsupported_algorithm():
    from pyconvmpi.plan import desc_struct

    geo = geo_of("2x8x16x16:16x5x5")
    if pyconvmpi._lib.algorithm_supported("winograd", "forward", desc_struct(geo)):
        pytest.skip("this build runs Winograd on 5x5 kernels")
    item = entry("2x8x16x16:16x5x5", plan=Plan(threads=1, algorithm="winograd"))
    assert "no longer supports" in profile.entry_problem(item)


def test_update_merges_entries_written_meanwhile(profile_path):
    profile.update([entry("2x8x16x16:16x3x3")])
    profile.update([entry("2x8x16x16:16x3x3:p2")])
    profile.update([entry("2x8x16x16:16x3x3", plan=Plan(threads=2))])
    entries, problem = profile.read_file(profile_path)
    assert problem is None
    assert len(entries) == 2
    plans = {e["layer"]: e["plan"]["threads"] for e in entries.values()}
    assert plans == {"2x8x16x16:16x3x3": 2, "2x8x16x16:16x3x3:p2": 1}


def test_update_replaces_corrupt_file(profile_path, caplog):
    profile_path.parent.mkdir(parents=True)
    profile_path.write_text("{truncated")
    caplog.set_level(logging.WARNING, logger="pyconvmpi")
    profile.update([entry()])
    assert "replacing it" in warnings_of(caplog)[0].getMessage()
    entries, problem = profile.read_file(profile_path)
    assert problem is None
    assert len(entries) == 1


def test_update_leaves_no_temporary_files(profile_path):
    profile.update([entry()])
    names = sorted(p.name for p in profile_path.parent.iterdir())
    assert names == ["profile.json", "profile.json.lock"]


def test_clear_removes_file(profile_path):
    assert profile.clear() is False
    profile.update([entry()])
    assert profile.clear() is True
    assert not profile_path.exists()


def _write_many(path, writer, count):
    # Runs in a separate process: many small updates, each a full lock-read-merge-replace.
    for index in range(count):
        text = f"{writer + 1}x8x16x16:16x3x3:p{index}"
        profile.update([entry(text)], path)


def test_concurrent_writers_keep_every_entry(tmp_path):
    path = tmp_path / "shared" / "profile.json"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(path, w, 15)) for w in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    entries, problem = profile.read_file(path)
    assert problem is None
    assert len(entries) == 4 * 15
    assert {e["layer"] for e in entries.values()} == {
        f"{w + 1}x8x16x16:16x3x3:p{i}" for w in range(4) for i in range(15)}
    json.loads(path.read_text())  # one complete JSON document
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_lookup_notices_other_writer(profile_path):
    geo = geo_of(LAYER)
    assert profile.lookup(geo, "forward", "float32") is None
    profile._write_atomic(profile_path.parent.mkdir(parents=True) or profile_path,
                          {profile.key_string(entry()["key"]): entry()})  # as another process
    assert profile.lookup(geo, "forward", "float32") is None  # within CHECK_INTERVAL
    time.sleep(profile.CHECK_INTERVAL + 0.05)
    assert profile.lookup(geo, "forward", "float32").block_k == 4


def test_lookup_reads_file_once(profile_path, monkeypatch):
    profile.update([entry()])
    geo = geo_of(LAYER)
    profile.lookup(geo, "forward", "float32")
    reads = []
    real_read = profile.read_file
    monkeypatch.setattr(profile, "read_file", lambda path: reads.append(path) or real_read(path))
    for _ in range(100):
        assert profile.lookup(geo, "forward", "float32") is not None
    assert reads == []
