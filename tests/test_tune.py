"""Tuner tests: the search space, the search against replayed timings, the command line, and
real short runs (one process and two mpiexec ranks)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

import pyconvmpi
from conftest import requires_mpiexec, run_mpi

from pyconvmpi import _lib, errors, layers, profile
from pyconvmpi._validate import geometry
from pyconvmpi.plan import Plan, desc_struct
from pyconvmpi.tune import cli, search, space as sp
from pyconvmpi.tune.measure import Measurement, agreed_failure, classify, time_call

REPLAY = json.loads((Path(__file__).parent / "data" / "tune_replay.json").read_text())
REPO = Path(__file__).resolve().parents[1]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def geo_of(text):
    layer = layers.parse_shape(text)
    return geometry(layer.input_shape, layer.weight_shape, fn="test", **layer.options())


def replay_space(name):
    data = REPLAY[name]
    ctx = sp.Context(geo_of(data["layer"]), data["direction"], data["comm_size"],
                     data["ranks_per_node"], data["cores"], data["comm_size"] > 1)
    configs = [row["config"] for row in data["rows"]]
    table = {sp.config_key(row["config"]): Measurement(row["seconds"], row["failure"])
             for row in data["rows"]}
    return sp.Space(ctx, configs=configs), table


class Replay:
    """An evaluate() that returns recorded measurements and counts the calls."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, plan, repeats):
        key = sp.config_key(sp.from_plan(plan))
        self.calls.append(key)
        return self.table.get(key, Measurement(0.05))  # the unrecorded default plan: slow


def run_search(name, seed, trials, storage=None, study_name="replay", **kwargs):
    space, table = replay_space(name)
    evaluate = Replay(table)
    study = search.make_study(storage or optuna.storages.InMemoryStorage(), study_name, seed)
    default = kwargs.pop("default", sp.to_plan(space.configs[0]))
    result = search.search(space, evaluate, study, trials, default, **kwargs)
    return result, study, evaluate, space


# --- the search space -----------------------------------------------------------------------

def collective_context(text="8x64x28x28:64x3x3:p1", comm_size=4, per_node=2, cores=8,
                       direction="forward"):
    return sp.Context(geo_of(text), direction, comm_size, per_node, cores, collective=True)


def test_space_help_lists_every_parameter():
    help_text = cli.build_parser().format_help()
    for param in sp.PARAMETERS:
        assert param.description
        assert param.name in sp.describe()
        assert param.name in help_text


def test_parse_fixed_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown search parameter 'blok_k'; known parameters "
                                         "are active_ranks, strategy"):
        sp.parse_fixed(["blok_k=8"])


def test_parse_fixed_bad_value_raises():
    with pytest.raises(ValueError, match="threads must be an integer; got 'two'"):
        sp.parse_fixed(["threads=two"])
    with pytest.raises(ValueError, match="must look like NAME=VALUE"):
        sp.parse_fixed(["threads"])


def test_check_config_unknown_name_raises():
    config = sp.from_plan(Plan())
    config["tile"] = 4
    with pytest.raises(ValueError, match=r"unknown search parameters \['tile'\]"):
        sp.check_config(config)


def test_enumerate_threads_within_cores():
    ctx = collective_context(comm_size=4, per_node=2, cores=8)
    configs = sp.enumerate_configs(ctx)
    assert configs
    for config in configs:
        assert 1 <= config["active_ranks"] <= 4
        assert min(config["active_ranks"], 2) * config["threads"] <= 8
    assert {c["threads"] for c in configs if c["active_ranks"] == 1} == {1, 2, 4, 8}
    assert {c["threads"] for c in configs if c["active_ranks"] == 4} == {1, 2, 4}


def test_enumerate_local_threads_per_rank_share():
    ctx = sp.Context(geo_of("2x8x16x16:8x3x3"), "forward", 1, ranks_per_node=2, cores=2)
    configs = sp.enumerate_configs(ctx)
    assert {c["threads"] for c in configs} == {1}
    assert {c["strategy"] for c in configs} == {"local"}
    assert {c["active_ranks"] for c in configs} == {1}


def test_enumerate_hybrid_grids_use_all_active_ranks():
    configs = sp.enumerate_configs(collective_context(comm_size=4, per_node=4, cores=4))
    hybrid = [c for c in configs if c["strategy"] == "hybrid"]
    assert hybrid
    assert {c["grid"] for c in hybrid} == {"2x2"}
    assert all(c["active_ranks"] == 4 for c in hybrid)
    assert all(c["grid"] == "0x0" for c in configs if c["strategy"] != "hybrid")


def test_enumerate_skips_splits_that_idle_ranks():
    configs = sp.enumerate_configs(collective_context("1x8x32x32:16x3x3:p1", 2, 2, 2))
    two = {c["strategy"] for c in configs if c["active_ranks"] == 2}
    assert two == {"channels", "rows"}


def test_enumerate_tiles_within_layer_and_read():
    geo = geo_of("2x6x9x9:6x3x3:g2")  # 3 output channels per group
    ctx = sp.Context(geo, "forward", 1, 1, 2)
    for config in sp.enumerate_configs(ctx):
        assert config["block_k"] <= 3
        assert config["block_c"] <= 3
        assert config["block_w"] <= geo.out_w
        read = sp.TILES_READ.get((config["algorithm"], "forward"), ())
        for tile in ("block_k", "block_c", "block_w"):
            if tile not in read:
                assert config[tile] == 0


def test_winograd_searched_only_on_request():
    geo = geo_of("2x16x16x16:16x3x3:p1")
    assert _lib.algorithm_supported("winograd", "forward", desc_struct(geo))

    def searched(**options):
        ctx = sp.Context(geo, "forward", 1, 1, 2, **options)
        return {c["algorithm"] for c in sp.enumerate_configs(ctx)}

    assert "winograd" not in searched()
    assert "winograd" in searched(allow_winograd=True)
    assert searched(fixed=(("algorithm", "winograd"),)) == {"winograd"}


def test_enumerate_only_supported_algorithms():
    for direction in sp.SEARCH_DIRECTIONS:
        geo = geo_of("2x8x16x16:8x3x3:s2:d2")
        configs = sp.enumerate_configs(sp.Context(geo, direction, 1, 1, 2))
        algorithms = {c["algorithm"] for c in configs}
        assert "reference" not in algorithms
        assert "auto" in algorithms
        for name in algorithms:
            assert _lib.algorithm_supported(name, direction, desc_struct(geo))


def test_enumerate_with_fixed_value():
    ctx = collective_context()
    ctx = sp.Context(ctx.geo, ctx.direction, 4, 2, 8, True, fixed=(("strategy", "rows"),))
    configs = sp.enumerate_configs(ctx)
    assert configs
    assert all(c["strategy"] == "rows" for c in configs)
    # With one active rank the strategy is always "batch", so pinning rows drops one rank.
    assert all(c["active_ranks"] > 1 for c in configs)


def test_space_without_configs_raises():
    ctx = sp.Context(geo_of("2x8x16x16:8x3x3"), "forward", 1, 1, 2, fixed=(("threads", 64),))
    with pytest.raises(ValueError, match="no valid configuration"):
        sp.Space(ctx)


def test_sample_yields_only_valid_configs():
    space = sp.Space(collective_context())
    valid = {sp.config_key(c) for c in space.configs}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(200):
        trial = study.ask()
        config = space.sample(trial)
        assert sp.config_key(config) in valid
        seen.add(sp.config_key(config))
        study.tell(trial, 1.0)
    # Random sampling over the valid set reaches many distinct plans, not a handful.
    assert len(seen) > min(len(valid), 200) // 2


def test_project_default_threads_zero_to_one():
    space = sp.Space(sp.Context(geo_of("2x8x16x16:8x3x3"), "forward", 1, 1, 2))
    params, projected = space.project(sp.from_plan(Plan(threads=0, algorithm="auto")))
    assert projected["threads"] == 1
    assert projected["algorithm"] == "auto"
    assert sp.config_key(projected) in {sp.config_key(c) for c in space.configs}


def test_to_plan_round_trip():
    config = {"active_ranks": 4, "strategy": "hybrid", "grid": "2x2", "threads": 2,
              "algorithm": "direct", "block_k": 8, "block_c": 0, "block_w": 0}
    plan = sp.to_plan(config)
    assert plan.grid == (2, 2)
    assert sp.from_plan(plan) == config


# --- the search against replayed timings ----------------------------------------------------

def test_search_replay_is_deterministic():
    first, _, calls_a, _ = run_search("collective", seed=7, trials=12)
    second, _, calls_b, _ = run_search("collective", seed=7, trials=12)
    assert calls_a.calls == calls_b.calls
    assert first.plan == second.plan
    assert first.seconds == second.seconds


def test_search_first_trial_is_default():
    space, _ = replay_space("collective")
    default = sp.to_plan(space.configs[-1])
    result, study, evaluate, _ = run_search("collective", seed=1, trials=5, default=default)
    assert study.trials[0].user_attrs["default"] is True
    assert study.trials[0].user_attrs["config"] == sp.from_plan(default)
    assert evaluate.calls[0] == sp.config_key(sp.from_plan(default))


def test_search_close_to_grid_best():
    space, table = replay_space("collective")
    grid_best = min(m.seconds for m in table.values() if m.seconds is not None)
    result, _, evaluate, _ = run_search("collective", seed=0, trials=20)
    measured = len(set(evaluate.calls))
    assert measured < len(space) / 3
    assert result.seconds <= grid_best * 1.05, (result.seconds, grid_best)


def test_search_exhaustive_measures_every_config():
    space, table = replay_space("local_forward")
    grid_best = min(m.seconds for m in table.values())
    result, study, evaluate, _ = run_search("local_forward", seed=0, trials=3, exhaustive=True)
    assert result.measured == len(space)
    assert result.seconds == grid_best


def test_search_records_failures_by_kind():
    result, study, _, _ = run_search("collective", seed=2, trials=40)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed
    for trial in failed:
        assert trial.user_attrs["failure"] in ("PCM_ERR_UNSUPPORTED", "timeout")
    assert sum(result.failures.values()) == len({json.dumps(t.user_attrs["config"])
                                                  for t in failed})
    assert result.measured == 40  # the study went on after failures


def test_search_never_slower_than_default():
    space, table = replay_space("local_forward")
    ranked = sorted((m.seconds, i) for i, m in enumerate(table.values()))
    fastest = space.configs[ranked[0][1]]
    result, _, _, _ = run_search("local_forward", seed=4, trials=2,
                                 default=sp.to_plan(fastest))
    assert result.seconds == result.default_seconds
    assert result.plan == sp.to_plan(fastest)


def test_search_retime_rejects_lucky_measurement():
    space, table = replay_space("local_forward")
    lucky = sp.config_key(space.configs[1])
    seen = set()

    def evaluate(plan, repeats):
        key = sp.config_key(sp.from_plan(plan))
        if key == lucky:
            first = key not in seen
            seen.add(key)
            return Measurement(1e-6 if first else 1.0)  # fast once by noise, slow re-timed
        return table[key]

    study = search.make_study(optuna.storages.InMemoryStorage(), "retime", 0)
    result = search.search(space, evaluate, study, len(space), sp.to_plan(space.configs[0]),
                           retime=3)
    assert sp.config_key(sp.from_plan(result.plan)) != lucky
    retimed = {sp.config_key(sp.from_plan(c.plan)) for c in result.candidates}
    assert lucky in retimed


def test_search_all_failed_returns_none():
    space, _ = replay_space("local_forward")
    study = search.make_study(optuna.storages.InMemoryStorage(), "fail", 0)
    result = search.search(space, lambda plan, repeats: Measurement(None, "PCM_ERR_INTERNAL"),
                           study, 4, sp.to_plan(space.configs[0]))
    assert result.plan is None
    assert result.failures == {"PCM_ERR_INTERNAL": 4}


def test_search_resumes_from_journal(tmp_path):
    journal = tmp_path / "journal.log"
    first, _, first_calls, _ = run_search("collective", 5, 6, search.open_storage(journal),
                                          "resume")
    second, study, second_calls, _ = run_search("collective", 5, 10,
                                                search.open_storage(journal), "resume")
    assert first.measured == 6
    assert second.measured == 4
    searched_before = set(first_calls.calls[:6])
    assert len(searched_before) == 6
    assert not set(second_calls.calls[:4]) & searched_before
    assert sum(1 for t in study.trials if t.user_attrs.get("default")) == 1


def test_search_resume_fails_interrupted_trial(tmp_path):
    storage = search.open_storage(tmp_path / "journal.log")
    study = search.make_study(storage, "interrupted", 0)
    study.ask()  # left running, as by a killed run
    result, study, _, _ = run_search("local_forward", 0, 3, storage, "interrupted")
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert result.measured == 3


def test_pick_shares_repeated_plans():
    plans = [Plan(threads=1), Plan(threads=2), Plan(threads=1)]
    calls = []

    def evaluate(plan, repeats):
        calls.append(plan)
        return Measurement(0.1 * plan.threads)

    best, seconds, timings = search.pick(evaluate, plans)
    assert best == Plan(threads=1)
    assert len(calls) == 2
    assert timings[2][1] is timings[0][1]


# --- timing and failure classes -------------------------------------------------------------

def test_classify_uses_status_and_class():
    assert classify(errors.UnsupportedError("any text")) == "PCM_ERR_UNSUPPORTED"
    assert classify(errors.RemoteRankError("x")) == "PCM_ERR_REMOTE"
    assert classify(ValueError("PCM_ERR_UNSUPPORTED in the text")) == "ValueError"
    assert classify(NotImplementedError()) == "NotImplementedError"


def test_agreed_failure_prefers_cause_over_remote():
    assert agreed_failure([None, "PCM_ERR_REMOTE", "PCM_ERR_OUT_OF_MEMORY"]) == "PCM_ERR_OUT_OF_MEMORY"
    assert agreed_failure(["PCM_ERR_REMOTE", None]) == "PCM_ERR_REMOTE"
    assert agreed_failure([None, None]) is None


def test_time_call_median_of_repeats():
    durations = iter([0.0, 0.03, 0.001, 0.002])

    def call():
        time.sleep(next(durations))

    result = time_call(call, None, warmup=1, repeats=3, trial_timeout=10)
    assert result.failure is None
    assert 0.001 < result.seconds < 0.02


def test_time_call_timeout_fails_trial():
    result = time_call(lambda: time.sleep(0.05), None, 0, 3, trial_timeout=0.01)
    assert result == Measurement(None, "timeout")


def test_time_call_exception_fails_trial():
    def call():
        raise errors.OutOfMemoryError("no memory", 3, "PCM_ERR_OUT_OF_MEMORY")

    assert time_call(call, None, 1, 3, 10) == Measurement(None, "PCM_ERR_OUT_OF_MEMORY")


def test_time_call_watchdog_fires_on_hang():
    fired = []
    time_call(lambda: time.sleep(0.2), None, 0, 1, 10, hard_limit=0.05,
              on_hang=lambda: fired.append(True))
    assert fired == [True]


def test_time_call_real_conv2d_with_plan():
    from pyconvmpi.tune.measure import Workload

    work = Workload(layers.parse_shape("2x4x8x8:4x3x3:p1"), "float64")
    for direction in ("forward", "backward_data", "backward_weight", "backward"):
        result = time_call(work.call(direction, Plan(threads=1, algorithm="direct")), None, 1, 2, 10)
        assert result.failure is None
        assert result.seconds > 0


# --- command line ---------------------------------------------------------------------------

def test_cli_help_states_units():
    help_text = cli.build_parser().format_help()
    assert "--trial-timeout SECONDS" in help_text
    assert "--timeout SECONDS" in help_text
    assert "OMP_NUM_THREADS" in help_text
    assert layers.SHAPE_FORMAT in help_text


@pytest.mark.parametrize("argv, message", [
    (["--fix", "tile=3"], "unknown search parameter 'tile'"),
    (["nosuchnet"], "layer must be a set name"),
    (["--ops", "sideways"], "comma-separated list of forward"),
    (["--trials", "0"], "must be a positive integer"),
])
def test_cli_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resolve_layers_sets_and_shapes():
    found = cli.resolve_layers(["mnist", "2x3x8x8:4x3x3:s2:p1"])
    assert [l.name for l in found] == ["conv1", "conv2", "2x3x8x8:4x3x3:s2:p1"]


def test_shape_text_round_trips():
    geo = geo_of("2x8x9x9:4x3x3:s2:p1:d2:g2")
    key = profile.key_dict(geo, "forward", "float32", 1, 1)
    assert cli.shape_text(key) == "2x8x9x9:4x3x3:s2:p1:d2:g2"


def tune_env(tmp_path, threads=1):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO),
               PYCONVMPI_PROFILE=str(tmp_path / "default-profile.json"))
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        env.pop(name, None)
    return env


def run_tune(args, tmp_path, timeout=120):
    command = ["timeout", "--signal=KILL", str(timeout), sys.executable, "-m", "pyconvmpi.tune",
               *args]
    return subprocess.run(command, capture_output=True, text=True, env=tune_env(tmp_path))


TINY = ["2x4x12x12:8x3x3:p1", "1x2x10x10:4x1x1"]


def test_cli_run_show_clear(tmp_path):
    path = tmp_path / "profile.json"
    done = run_tune([*TINY, "--trials", "3", "--profile", str(path)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "summary (1 ranks, 8 profile entries written" in done.stdout
    assert "tuned plan" in done.stdout
    entries, problem = profile.read_file(path)
    assert problem is None
    assert {e["key"]["direction"] for e in entries.values()} == set(profile.DIRECTIONS)
    shown = run_tune(["--show", "--profile", str(path)], tmp_path)
    assert shown.returncode == 0
    assert "2x4x12x12:8x3x3:p1" in shown.stdout
    assert shown.stdout.count(" ok") == 8
    cleared = run_tune(["--clear", "--profile", str(path)], tmp_path)
    assert cleared.returncode == 0
    assert not path.exists()


def test_cli_show_corrupt_profile_fails(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text("{ not json")
    result = run_tune(["--show", "--profile", str(path)], tmp_path)
    assert result.returncode == 1
    assert "is not valid JSON" in result.stdout


def test_cli_killed_run_resumes_from_journal(tmp_path):
    journal, path = tmp_path / "journal.log", tmp_path / "profile.json"
    args = [sys.executable, "-m", "pyconvmpi.tune", "4x32x56x56:32x3x3:p1", "--ops", "forward",
            "--trials", "12", "--repeats", "10", "--storage", str(journal), "--profile", str(path)]
    process = subprocess.Popen(args, env=tune_env(tmp_path), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count('"config"') >= 3:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the first run wrote no trials within 60 s")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not path.exists()  # killed before its profile was written

    done = run_tune(args[3:], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resumed with" in done.stderr
    storage = search.open_storage(journal)
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    measured = {json.dumps(t.user_attrs["config"], sort_keys=True) for t in study.trials
                if "config" in t.user_attrs and not t.user_attrs.get("repeat")
                and t.state == optuna.trial.TrialState.COMPLETE}
    space_size = profile.read_file(path)[0].popitem()[1]["space_size"]
    assert len(measured) == min(12, space_size)
    assert sum(1 for t in study.trials if t.user_attrs.get("default")) == 1


@requires_mpiexec
@pytest.mark.mpi
def test_mpiexec_two_ranks_tune_writes_profile(tmp_path):
    path = tmp_path / "profile.json"
    done = run_mpi(2, ["-m", "pyconvmpi.tune", *TINY, "--trials", "3", "--profile", path],
                   timeout=180, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("summary (2 ranks") == 1  # rank 0 alone prints
    entries, problem = profile.read_file(path)
    assert problem is None
    assert len(entries) == 8
    for entry in entries.values():
        assert profile.entry_problem(entry) is None
        assert entry["key"]["ranks_per_node"] == 2
        plan = Plan.from_dict(entry["plan"])
        assert plan.threads * min(plan.active_ranks, 2) <= os.cpu_count()


@requires_mpiexec
@pytest.mark.mpi
def test_mpiexec_error_on_rank0_ends_every_rank(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    started = time.monotonic()
    done = run_mpi(2, ["-m", "pyconvmpi.tune", TINY[1], "--trials", "2", "--ops", "forward",
                       "--profile", blocker / "profile.json"], timeout=120,
                   env={"PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert time.monotonic() - started < 100
    assert "pyconvmpi.tune: error: rank 0 failed" in done.stderr
    assert "not-a-directory" in done.stderr


@requires_mpiexec
@pytest.mark.mpi
def test_mpiexec_failure_on_rank1_ends_every_rank(tmp_path):
    from conftest import MPIEXEC

    tune = [sys.executable, "-m", "mpi4py", "-m", "pyconvmpi.tune", TINY[1], "--trials", "2",
            "--start-timeout", "15", "--profile", str(tmp_path / "p.json")]
    # MPMD launch: rank 1 alone gets a library path that does not exist.
    command = ["timeout", "--signal=KILL", "120", str(MPIEXEC), "-n", "1", *tune, ":",
               "-env", "PYCONVMPI_LIBRARY", str(tmp_path / "missing.so"), "-n", "1", *tune]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=tune_env(tmp_path))
    assert done.returncode not in (0, -signal.SIGKILL, 128 + signal.SIGKILL)
    assert time.monotonic() - started < 100
    assert "missing.so" in done.stderr
    assert "Timeout (0:00:15)!" in done.stderr  # rank 0 gave up waiting in MPI_Init


def test_session_agree_raises_on_failure():
    from mpi4py import MPI

    from pyconvmpi.tune.driver import AgreedError, Session

    args = cli.build_parser().parse_args([])
    session = Session(MPI.COMM_SELF, args, collective=False, ranks_per_node=1)
    assert session.agree(lambda: 5, "compute") == 5
    with pytest.raises(AgreedError, match="rank 0 could not set up: MemoryError: too big"):
        session.agree(lambda: (_ for _ in ()).throw(MemoryError("too big")), "set up")


def distributed_available():
    """Return whether collective conv2d runs in this build (tried on COMM_SELF)."""
    from mpi4py import MPI

    try:
        pyconvmpi.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 3, 3), np.float32),
                         comm=MPI.COMM_SELF)
    except NotImplementedError:
        return False
    return True


LOOKUP_SCRIPT = """
import sys
from mpi4py import MPI
import pyconvmpi
comm = MPI.COMM_WORLD
for op in ("forward", "backward"):
    chosen = pyconvmpi.plan((2, 4, 12, 12), (8, 4, 3, 3), padding=1, op=op, comm=comm)
    sys.stdout.write(f"{comm.rank} {op} {chosen.source} {chosen.strategy} {chosen.active_ranks}\\n")
"""


@requires_mpiexec
@pytest.mark.mpi
def test_mpiexec_collective_tune_used_by_plan(tmp_path):
    if not distributed_available():
        pytest.skip("distributed conv2d is not built yet")
    path = tmp_path / "profile.json"
    env = {"PYTHONPATH": str(REPO), "PYCONVMPI_PROFILE": str(path)}
    done = run_mpi(2, ["-m", "pyconvmpi.tune", TINY[0], "--trials", "6", "--mode", "collective"],
                   timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    assert "collective calls" in done.stdout
    entries = profile.read_file(path)[0]
    assert {e["key"]["comm_size"] for e in entries.values()} == {2}
    for entry in entries.values():
        plan = Plan.from_dict(entry["plan"])
        assert plan.strategy in ("batch", "channels", "rows", "hybrid")
        assert 1 <= plan.active_ranks <= 2
    script = tmp_path / "lookup.py"
    script.write_text(LOOKUP_SCRIPT)
    looked = run_mpi(2, [script], timeout=120, env=env)
    assert looked.returncode == 0, looked.stderr
    lines = sorted(looked.stdout.splitlines())
    assert len(lines) == 4
    for line in lines:
        assert line.split()[2] == "profile", line


@requires_mpiexec
@pytest.mark.mpi
def test_mpiexec_collective_mode_without_distributed_fails_cleanly(tmp_path):
    if distributed_available():
        pytest.skip("distributed conv2d is built; see test_mpiexec_collective_tune_used_by_plan")
    done = run_mpi(2, ["-m", "pyconvmpi.tune", TINY[1], "--mode", "collective", "--profile",
                       tmp_path / "p.json"], timeout=120, env={"PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert "--mode collective: distributed conv2d failed (NotImplementedError)" in done.stderr


def test_cli_timeout_skips_remaining_layers(tmp_path):
    path = tmp_path / "profile.json"
    done = run_tune([*TINY, "--trials", "2", "--timeout", "0.001", "--profile", str(path)],
                    tmp_path)
    assert done.returncode == 0, done.stderr
    # The first layer may start before the limit passes; the last one cannot.
    assert f"--timeout reached; skipping {TINY[1]} float32" in done.stderr
    entries = profile.read_file(path)[0]
    assert {e["layer"] for e in entries.values()} <= {TINY[0]}


@pytest.mark.benchmark
def test_benchmark_tuned_not_slower_than_default(tmp_path, request):
    if "benchmark" not in (request.config.getoption("-m") or ""):
        pytest.skip("real timing; select with -m benchmark")
    path = tmp_path / "profile.json"
    done = run_tune(["resnet18", "--ops", "forward", "--trials", "8", "--profile", str(path)],
                    tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr
    for entry in profile.read_file(path)[0].values():
        assert entry["time_s"] <= entry["default_time_s"]
