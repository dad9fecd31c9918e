"""The search of one layer and direction: Optuna proposes, a measurement decides.

``search`` runs on the rank that owns the study (rank 0). It calls only an ``evaluate(plan,
repeats)`` function returning a Measurement, so the same logic runs against real timings
under MPI and against replayed timings in tests.
"""

import logging
import random
import time
import warnings
import zlib
from typing import NamedTuple, Optional

import optuna

from .. import _lib
from .._version import __version__
from . import space as sp
from .measure import Measurement

logger = logging.getLogger(__name__)

STARTUP_TRIALS = 4  # random trials before TPE models the results


class Candidate(NamedTuple):
    """A configuration and its measurement in the search and in the final re-timing."""

    plan: object
    search_seconds: Optional[float]
    retime_seconds: Optional[float]
    failure: Optional[str] = None


class SearchResult(NamedTuple):
    """Outcome of one search: the chosen plan (None if every candidate failed) and its cost."""

    plan: object
    seconds: Optional[float]
    default_plan: object
    default_seconds: Optional[float]
    measured: int
    failures: dict
    elapsed: float
    candidates: tuple


def open_storage(path):
    """Return an Optuna storage: a journal file at ``path`` (so a run resumes), or in memory."""
    if path is None:
        return optuna.storages.InMemoryStorage()
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def make_study(storage, name, seed):
    """Create or resume the study ``name`` with a TPE sampler seeded from ``seed`` and the name.

    The seed, the library version and the ABI number are stored as study attributes.

    Multivariate TPE with ``group=True`` models the conditional parameters of the space
    together; both are flagged experimental by Optuna, so that warning is silenced here.
    """
    sampler_seed = (zlib.crc32(name.encode()) ^ int(seed)) & 0x7FFFFFFF
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=STARTUP_TRIALS,
                                             multivariate=True, group=True)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    study.set_user_attr("seed", int(seed))
    study.set_user_attr("version", __version__)
    study.set_user_attr("abi", _lib.ABI_VERSION)
    return study


def _resume(study, cache):
    """Fill ``cache`` from earlier trials of a resumed study; fail trials left running."""
    state = optuna.trial.TrialState
    waiting = False
    for frozen in study.get_trials(deepcopy=False):
        if frozen.state == state.RUNNING:
            # The run that owned this trial was interrupted before it could tell a result.
            study.tell(frozen.number, state=state.FAIL)
        elif frozen.state == state.WAITING:
            waiting = True
        config = frozen.user_attrs.get("config")
        if config is None or frozen.user_attrs.get("repeat"):
            continue
        key = sp.config_key(config)
        if frozen.state == state.COMPLETE:
            cache[key] = (config, Measurement(frozen.value))
        elif frozen.state == state.FAIL and "failure" in frozen.user_attrs:
            cache[key] = (config, Measurement(None, frozen.user_attrs["failure"]))
    return waiting


def search(space, evaluate, study, trials, default_plan, *, start_plan=None, deadline=None,
           retime=3, retime_repeats=None, exhaustive=False, progress=None):
    """Search ``space`` for the fastest plan; return a SearchResult.

    Parameters
    ----------
    space : Space
    evaluate : callable
        ``evaluate(plan, repeats)`` returns a Measurement; ``repeats=None`` means the default.
    study : optuna.Study
        Fresh or resumed; the trials of a resumed study count towards ``trials``.
    trials : int
        Distinct configurations to measure (a proposal already measured gets its earlier
        result and costs nothing).
    default_plan : Plan
        The heuristic plan. Its nearest valid configuration is the first trial, and the plan
        itself is re-timed with the best candidates, so the result is never slower than the
        default on this measurement.
    start_plan : Plan, optional
        The plan whose nearest configuration is the first trial, when it differs from
        ``default_plan`` (for instance with threads=0 resolved to a count).
    deadline : float, optional
        ``time.monotonic()`` value after which no new trial starts.
    retime : int
        Best distinct configurations re-timed before choosing.
    exhaustive : bool
        Measure every configuration of the space in order instead of sampling (the grid the
        tuner is compared with).
    progress : callable, optional
        ``progress(measured, trials, best_seconds)`` after each trial.
    """
    started = time.monotonic()
    cache = {}
    waiting = _resume(study, cache)
    measured_before = len(cache)
    if not study.trials and not exhaustive:
        params, _ = space.project(sp.from_plan(start_plan or default_plan))
        study.enqueue_trial(params, user_attrs={"default": True})
    elif not waiting and not exhaustive:
        logger.info("study %s resumed with %d measured configurations", study.study_name,
                    measured_before)
    budget = len(space) if exhaustive else min(trials, len(space))
    grid = iter(space.configs)
    rng = random.Random(f"{study.study_name}|{len(study.trials)}")
    asks = 0
    while len(cache) < budget and asks < 2 * budget + 10:
        if deadline is not None and time.monotonic() > deadline:
            break
        asks += 1
        if exhaustive:
            config = next(grid)
            if sp.config_key(config) in cache:
                continue
            trial = study.ask()  # the grid needs no sampler; the config is stored below
        else:
            trial = study.ask()
            config = space.sample(trial)
        trial.set_user_attr("config", config)
        key = sp.config_key(config)
        if key in cache:
            # TPE keeps proposing its favourite once it has converged; the repeat gets the
            # earlier result, and an unmeasured configuration, chosen at random, goes next.
            trial.set_user_attr("repeat", True)
            result = cache[key][1]
            unmeasured = [c for c in space.configs if sp.config_key(c) not in cache]
            if unmeasured:
                params, _ = space.project(unmeasured[rng.randrange(len(unmeasured))])
                study.enqueue_trial(params, skip_if_exists=False)
        else:
            result = evaluate(sp.to_plan(config), None)
            cache[key] = (config, result)
        if result.seconds is None:
            trial.set_user_attr("failure", result.failure)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, result.seconds)
        if progress is not None:
            progress(len(cache), budget, _best(cache))

    failures = {}
    for _, result in cache.values():
        if result.failure is not None:
            failures[result.failure] = failures.get(result.failure, 0) + 1
    ranked = sorted((r.seconds, i, c) for i, (c, r) in enumerate(cache.values())
                    if r.seconds is not None)
    candidates = [(sp.to_plan(c), s) for s, _, c in ranked[:retime]]
    default_key = sp.config_key(sp.from_plan(default_plan))
    default_search = cache.get(default_key, (None, Measurement(None)))[1].seconds
    candidates = [(p, s) for p, s in candidates if sp.config_key(sp.from_plan(p)) != default_key]
    candidates.append((default_plan, default_search))

    timed = []
    for plan, search_seconds in candidates:
        result = evaluate(plan, retime_repeats)
        timed.append(Candidate(plan, search_seconds, result.seconds, result.failure))
    best = min((c for c in timed if c.retime_seconds is not None),
               key=lambda c: c.retime_seconds, default=None)
    default = timed[-1]
    return SearchResult(
        plan=best.plan if best else None, seconds=best.retime_seconds if best else None,
        default_plan=default_plan, default_seconds=default.retime_seconds,
        measured=len(cache) - measured_before, failures=failures,
        elapsed=time.monotonic() - started, candidates=tuple(timed),
    )


def _best(cache):
    times = [r.seconds for _, r in cache.values() if r.seconds is not None]
    return min(times) if times else None


def pick(evaluate, plans, repeats=None):
    """Time each distinct plan of ``plans`` once more; return ``(best, seconds, timings)``.

    ``timings`` lists ``(plan, Measurement)`` for every plan given, in order, a repeated plan
    sharing the measurement of its first occurrence. Used for the combined backward plan,
    chosen among the per-direction winners and the default.
    """
    measured, timings = {}, []
    for plan in plans:
        key = sp.config_key(sp.from_plan(plan))
        if key not in measured:
            measured[key] = evaluate(plan, repeats)
        timings.append((plan, measured[key]))
    ok = [(p, m.seconds) for p, m in timings if m.seconds is not None]
    if not ok:
        return None, None, timings
    plan, seconds = min(ok, key=lambda item: item[1])
    return plan, seconds, timings
