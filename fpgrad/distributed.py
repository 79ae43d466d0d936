"""Studies on a Ray cluster: `RayExecutor`, one Ray task per configuration, rows back to the driver.

The executor only computes: it yields (config, row) as tasks finish and `run_study` (in the driver, the one
writer) appends each row to `rows.jsonl` at once, so a killed driver resumes losing no finished row.

Workers import the study by module name (`Study.module`). On a cluster on this machine the driver's own
import paths (its working directory, the folder of a study module outside the package) are passed to the
workers through `PYTHONPATH`; on a cluster of other machines, fpgrad and the study modules must be installed
on every node (`pip install 'fpgrad[distributed]'` in the same environment as Ray), or shipped with a
`runtime_env` (e.g. `{"working_dir": "."}`).

Needs the `distributed` extra: `pip install 'fpgrad[distributed]'` (Ray >= 2.9).
"""

from __future__ import annotations

import json
import logging
import os
import site
import sys
import sysconfig
from typing import Any, Iterator

from .study import Config, Row, Study, StudyTaskError, _run_by_name, config_key

INSTALL_HINT = "pip install 'fpgrad[distributed]'"


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"RayExecutor needs Ray, which is not installed ({e}); install it with {INSTALL_HINT} "
                          f"(or pip install 'ray>=2.9')") from e
    return ray


def _run_config(module: str, config: Config, threads: int) -> Row:
    """The Ray task: torch on `threads` threads (the task's CPUs), then the study's run on one configuration."""
    import torch
    torch.set_num_threads(threads)
    return _run_by_name(module, config)


def _interpreter_paths() -> list[str]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    paths.add(site.getusersitepackages())
    return [os.path.realpath(p) for p in paths if p]


def driver_code_paths() -> list[str]:
    """The driver's `sys.path` folders that are not the interpreter's own (stdlib, site-packages): its working
    directory and any folder a study module was imported from. Passed to workers as their PYTHONPATH."""
    own = _interpreter_paths()
    out: list[str] = []
    for p in sys.path:
        p = os.path.realpath(p or os.getcwd())
        if not os.path.isdir(p) or p in out:
            continue
        if any(p == root or p.startswith(root.rstrip(os.sep) + os.sep) for root in own):
            continue
        out.append(p)
    return out


def _describe(config: Config) -> str:
    return json.dumps(config, sort_keys=True, default=str)


class RayExecutor:
    """Runs each configuration as a Ray task; yields (config, row) as tasks finish (`ray.wait`).

    A task takes `num_cpus_per_task` CPUs (torch runs on that many threads) and `num_gpus_per_task` GPUs. A task
    whose worker process dies (killed, out of memory, a crash) is run again by Ray up to `max_retries` times; a
    Python exception in the study is not retried: it is a bug, and it raises `StudyTaskError` naming the
    configuration, with the worker's traceback as its cause (the tasks still pending are cancelled; finished
    rows are already stored, so a rerun resumes).

    If Ray is not initialised, `map` connects to `address` (e.g. "auto" for a `ray start` cluster on this
    machine, "host:6379"; else the RAY_ADDRESS environment variable) or starts a new local Ray for the run
    (`num_cpus` = os.cpu_count(), no dashboard), and shuts down only what it started. `init_kwargs` go to
    `ray.init`; `runtime_env` is each task's (the driver's import paths are prepended to its PYTHONPATH).

    The workers import the study by `Study.module` and run that module's `STUDY.run`, not the driver's object.
    """

    def __init__(self, address: str | None = None, num_cpus_per_task: float = 1, num_gpus_per_task: float = 0,
                 max_retries: int = 2, init_kwargs: dict | None = None, runtime_env: dict | None = None):
        if not num_cpus_per_task > 0:
            raise ValueError(f"RayExecutor: num_cpus_per_task must be positive, got {num_cpus_per_task}")
        if num_gpus_per_task < 0:
            raise ValueError(f"RayExecutor: num_gpus_per_task must be >= 0, got {num_gpus_per_task}")
        if max_retries < 0:
            raise ValueError(f"RayExecutor: max_retries must be >= 0 (0: no retry), got {max_retries}")
        _import_ray()                       # fail here, with the install hint, not mid-study
        self.address = address
        self.num_cpus_per_task = num_cpus_per_task
        self.num_gpus_per_task = num_gpus_per_task
        self.max_retries = int(max_retries)
        self.init_kwargs = dict(init_kwargs or {})
        self.runtime_env = dict(runtime_env or {})

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, num_cpus_per_task={self.num_cpus_per_task}, "
                f"num_gpus_per_task={self.num_gpus_per_task}, max_retries={self.max_retries})")

    def _connect(self, ray) -> bool:
        """ray.init unless Ray is already initialised; True if this call initialised it."""
        if ray.is_initialized():
            return False
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": True}
        if address == "local":              # a new Ray on this machine, even if a `ray start` cluster is running
            kwargs.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
        kwargs.update(self.init_kwargs)
        ray.init(address=address, **kwargs)
        return True

    def task_runtime_env(self) -> dict:
        """The runtime_env of every task: the caller's, with the driver's import paths ahead of its PYTHONPATH
        (and of the cluster's, kept after them)."""
        env = dict(self.runtime_env)
        env_vars = dict(env.get("env_vars", {}))
        paths = driver_code_paths()
        env_vars["PYTHONPATH"] = os.pathsep.join([*paths, env_vars.get("PYTHONPATH", "${PYTHONPATH}")])
        env["env_vars"] = env_vars
        return env

    def _failure(self, ray, study: Study, config: Config, error: Exception) -> str:
        """The message of a failed task: the study's exception, or the worker's death after the retries."""
        what = f"study {study.name!r}: configuration {_describe(config)}"
        if isinstance(error, ray.exceptions.RayTaskError):       # a Python exception in the study: a bug
            cause = error.cause if isinstance(error.cause, BaseException) else error
            return f"{what} raised {type(cause).__name__}: {cause} (worker traceback above)"
        detail = f"{type(error).__name__}: {str(error).strip().rstrip('.')}"
        died = tuple(getattr(ray.exceptions, name) for name in
                     ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "LocalRayletDiedError")
                     if hasattr(ray.exceptions, name))
        if isinstance(error, died):
            return (f"{what}: its worker process died on each of {self.max_retries + 1} attempt(s) ({detail}). "
                    f"Usually out of memory or a crash in native code: run this configuration locally to see it "
                    f"fail, give each task more room (--cpus-per-task), or raise --retries (max_retries) if "
                    f"the cluster's nodes are preempted")
        return f"{what} failed on Ray ({detail})"

    def map(self, study: Study, configs: list[Config]) -> Iterator[tuple[Config, Row]]:
        if not configs:
            return
        if not study.module or study.module == "__main__":
            raise ValueError(f"RayExecutor: study {study.name!r} has module={study.module!r}; Ray workers import "
                             f"the study by module name, so define it in an importable module with "
                             f"Study(..., module=__name__)")
        ray = _import_ray()
        started = self._connect(ray)
        pending: dict[Any, Config] = {}
        try:
            task = ray.remote(_run_config)
            options = dict(num_cpus=self.num_cpus_per_task, num_gpus=self.num_gpus_per_task,
                           max_retries=self.max_retries, retry_exceptions=False, runtime_env=self.task_runtime_env())
            threads = max(1, int(self.num_cpus_per_task))
            for c in configs:
                ref = task.options(**options, name=f"{study.name}:{config_key(c)}").remote(study.module, c, threads)
                pending[ref] = c
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    config = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        raise StudyTaskError(self._failure(ray, study, config, e), study=study.name,
                                             config=config) from e
                    yield config, row
        finally:
            for ref in pending:             # a failure or an interrupted driver: stop the tasks nobody will read
                try:
                    ray.cancel(ref)
                except Exception:   # best effort; ray.shutdown or the job's end stops them anyway
                    pass
            if started:
                ray.shutdown()
