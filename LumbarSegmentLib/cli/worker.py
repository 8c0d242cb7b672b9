"""A warm segmentation worker: one long-lived process that keeps the models ready between drafts.

A front end (the Slicer module, the browser app) that starts ``lumbarseg segment`` for every draft
pays the interpreter start, the imports and the model load each time (seconds). The worker
pays them once, then serves drafts one after the other:

    python -m LumbarSegmentLib.cli.worker serve [--preload REF[,REF]] [--runtime R] [--max-rss-mb M] [--max-jobs N]

Requests are JSON lines on stdin; each is the argument list of a ``lumbarseg segment`` command
(as ``segment_job.segment_command`` builds it, without the interpreter) and the progress file to
write to::

    {"job": "3", "argv": ["segment", "in.nrrd", "--output", "out.nrrd", "--report", "r.json", ...],
     "progress": "/path/progress.jsonl"}
    {"op": "quit"}

Every request runs exactly the command's own code (``cli.cmd_segment``: the same checks, engine
call, report and all-or-nothing outputs); only the models come from the worker's cache (keyed by
package path and weights SHA-256, so a re-published model is loaded again). Into the request's
progress file go ``batch`` events while it runs, then one ``done`` (``job``, ``report``, ``rss_mb``)
or ``error`` (``job``, ``message``) event: the schema of ``progress.py``.

Runtimes. A request that asks for ``--runtime openvino`` (or ``onnx``) on the CPU runs as the command
does, without PyTorch (:mod:`inference.host_runner`): the worker then hands the engine the packages,
not PyTorch networks, and the compiled OpenVINO models stay in the process (``openvino_runner``'s
table, bounded) from one draft and one case to the next. A request that leaves the runtime at
``auto`` gets the worker's draft runtime (``serve --runtime``, default ``auto``: :func:`draft_runtime`
picks per machine, as the command does: OpenVINO where no GPU is present and it is installed; PyTorch
otherwise); the report names the runtime that ran.

Cancel = kill the process (``worker_client.WarmWorker.kill``): nothing is half-written (the command
commits its outputs at the end) and every byte of memory returns; the next draft starts a fresh
worker. Memory stays bounded: after a job the worker exits (a clean retirement, announced in the
``done`` event as ``retiring``) once its resident memory exceeds ``--max-rss-mb`` or it has
served ``--max-jobs`` requests; the client starts a new one for the next draft. End of stdin (the
parent went away) ends the worker too.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from LumbarSegmentLib.core.progress import DONE, ERROR, PROGRESS_ENV, ProgressLog

DEFAULT_MAX_RSS_MB = 2048
DEFAULT_MAX_JOBS = 200
DRAFT_RUNTIMES = ("auto", "torch", "onnx", "openvino")
WARM_FOV_MM = 300.0  # the plane warmed up for OpenVINO: a usual sagittal lumbar field of view


def resident_mb() -> float:
    """This process's resident memory now (MB): psutil, else /proc, else the peak from getrusage."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:  # Windows without psutil: no bound can be checked
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def draft_runtime(requested: str = "auto") -> str:
    """The runtime for drafts that leave ``--runtime`` at ``auto``: the command's own choice for this
    machine (:func:`inference.runtime_choice.machine_runtime`: OpenVINO where no GPU is present and it
    is installed; PyTorch otherwise)."""
    from LumbarSegmentLib.inference.runtime_choice import machine_runtime

    return machine_runtime(requested)


class ModelCache:
    """Models loaded once per worker: ``resolve(arg, mode)`` has the signature of ``cli.resolve_models``."""

    def __init__(self):
        self._loaded: dict[tuple, object] = {}

    def resolve(self, arg: str | None, mode: str, host: bool = False) -> list:
        """PyTorch networks, loaded once; ``host``: the packages themselves (a request served without
        PyTorch: its compiled networks are kept by the runtime's own per-process table)."""
        from LumbarSegmentLib.cli.main import resolve_models

        packages = resolve_models(arg, mode)  # reads the registries now: a new default is seen at once
        if host:
            return packages
        from LumbarSegmentLib.inference.engine import LoadedModel

        out = []
        for pkg in packages:
            key = (str(pkg.path), pkg.sha256)
            if key not in self._loaded:
                self._loaded[key] = LoadedModel.from_package(pkg)
            out.append(self._loaded[key])
        return out


def warm_up(cache: ModelCache, refs: str | None, runtime: str = "torch", threads: int | None = None) -> None:
    """Load ``refs`` (or the default model) and run one slice through each: the first draft then finds
    the weights, the inference graph and the CPU library's kernels ready. With OpenVINO, which compiles
    one network per window size, the slice spans a typical lumbar field of view (``WARM_FOV_MM``) at
    the model's spacing, so a usual clinical stack finds its network compiled (and converted, when the
    cache lacked it); a plane of another size pays its own compilation (0.1-0.3 s) on its first draft."""
    import numpy as np

    from LumbarSegmentLib.core.volume import Volume
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.inference.host_runner import runs_without_torch

    opts = SegmentOptions(device="cpu", slice_smoothing_mm=0, runtime=runtime, threads=threads)
    host = runs_without_torch([], opts)
    rng = np.random.default_rng(0)
    for model in cache.resolve(refs, "fast", host=host):
        (sh, sw) = model.spacing if host else (1.0, 1.0)
        h, w = (round(WARM_FOV_MM / sh), round(WARM_FOV_MM / sw)) if host else (64, 64)
        vol = Volume(array=(rng.random((1, h, w)) * 100).astype(np.float32), spacing=(sw, sh, 4.0),  # one sagittal
                     origin=(0.0, 0.0, 0.0), direction=np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]))  # slice
        segment_volume(vol, [model], opts)


def run_request(req: dict, cache: ModelCache, runtime: str = "torch") -> dict:
    """One request: the ``segment`` command with cached models; returns the closing event's fields.
    ``runtime``: what a request that leaves ``--runtime`` at ``auto`` runs on (:func:`draft_runtime`)."""
    from dataclasses import replace
    from functools import partial

    from LumbarSegmentLib.cli.main import build_parser, cmd_segment, one_line
    from LumbarSegmentLib.inference.host_runner import runs_without_torch
    from LumbarSegmentLib.inference.options import SegmentOptions
    from LumbarSegmentLib.inference.runtime_choice import auto_runtime

    job = str(req.get("job", ""))
    argv = req.get("argv")
    if not isinstance(argv, list) or argv[:1] != ["segment"]:
        return {"event": ERROR, "job": job, "message": "a worker request must be a 'segment' command"}
    try:
        args = build_parser().parse_args([str(a) for a in argv])
    except SystemExit:  # argparse printed its usage line to stderr (the worker's log)
        return {"event": ERROR, "job": job, "message": "the segment command in the request is not valid"}
    try:
        options = SegmentOptions.from_namespace(args)
        args.runtime = auto_runtime(options, runtime)  # the worker's draft runtime, by the command's own rule
        host = runs_without_torch([], replace(options, runtime=args.runtime))
        cmd_segment(args, resolve=partial(cache.resolve, host=host))
    except (ValueError, OSError, RuntimeError, MemoryError) as exc:
        return {"event": ERROR, "job": job, "message": one_line(exc)}
    return {"event": DONE, "job": job, "report": args.report}


def serve(stdin, *, preload: str | None, max_rss_mb: float, max_jobs: int, runtime: str = "torch",
          threads: int | None = None) -> int:
    cache = ModelCache()
    if preload is not None:
        warm_up(cache, preload or None, runtime, threads)
    print("worker ready", flush=True)
    served = 0
    for line in stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError:
            print("worker: error: a request line is not JSON; ignored", flush=True)
            continue
        if not isinstance(req, dict) or req.get("op") == "quit":
            break
        progress = req.get("progress")
        if progress:
            os.environ[PROGRESS_ENV] = str(progress)  # cli._segment_one writes its batch events there
        closing = run_request(req, cache, runtime)
        served += 1
        gc.collect()
        rss = resident_mb()
        retiring = served >= max_jobs or rss > max_rss_mb
        ProgressLog(progress).write(closing.pop("event"), **closing, rss_mb=round(rss), retiring=retiring)
        print(f"worker: job {req.get('job', '')} finished ({rss:.0f} MB resident)", flush=True)
        if retiring:
            break
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m LumbarSegmentLib.cli.worker",
                                description="a warm segmentation worker (JSON-lines requests on stdin)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve segment requests from stdin until it ends")
    s.add_argument("--preload", nargs="?", const="", default=None, metavar="REF[,REF]",
                   help="load these models (no value: the default model) and warm them up before the first request")
    s.add_argument("--max-rss-mb", type=float, default=DEFAULT_MAX_RSS_MB,
                   help=f"retire after a job once resident memory exceeds this (default {DEFAULT_MAX_RSS_MB})")
    s.add_argument("--max-jobs", type=int, default=DEFAULT_MAX_JOBS,
                   help=f"retire after this many requests (default {DEFAULT_MAX_JOBS})")
    s.add_argument("--runtime", choices=DRAFT_RUNTIMES, default="auto",
                   help="what computes drafts that leave --runtime at auto (default auto: OpenVINO on a "
                        "machine without a GPU, where installed; else PyTorch)")
    from LumbarSegmentLib.inference.options import SegmentOptions

    SegmentOptions.add_arguments(s, only=("threads",))  # the range of `lumbarseg segment --threads`
    a = p.parse_args(argv)
    from LumbarSegmentLib.inference import engine  # noqa: F401  (before torch: the engine chooses the OpenMP wait policy)

    runtime = draft_runtime(a.runtime)
    if a.threads and runtime == "torch":  # (OpenVINO takes the threads per request; PyTorch stays unimported)
        import torch

        torch.set_num_threads(a.threads)
    return serve(sys.stdin, preload=a.preload, max_rss_mb=a.max_rss_mb, max_jobs=a.max_jobs, runtime=runtime,
                 threads=a.threads)


if __name__ == "__main__":
    sys.exit(main())
