"""``emseg predict --scheduler ADDRESS``: the same prediction, run on a dask.distributed cluster.

Design (dask does the scheduling, retries and recovery; emseg only defines the tasks):

* One task per page: a worker opens the input (same path, so inputs must be on storage the
  workers can read), reads page ``i``, runs :meth:`emseg.infer.predictor.Predictor.page_result` with the
  options of the run, and returns the labels (and probabilities when asked) to the client.
  Results are therefore identical to the single-process run's (same code, same page, same
  options; float rounding of the network may differ between thread counts, labels in practice do not).
* The client streams results, in page order, into the same atomic writers as ``emseg predict``
  (TIFF page by page, or zarr): nothing but the pages in flight is ever held, and a file is renamed
  into place only once all its pages are written. At most ``window`` pages (default: twice the
  cluster's worker threads) are submitted ahead, so neither workers nor client hold the volume.
* The weights (safetensors bytes) and the model card are shipped once per worker in a
  :class:`ModelPlugin` (a dask worker plugin, also installed on workers that join or restart
  later), never per task; each worker builds its Predictor once, on its first page.
* A worker that dies loses only the pages it held: dask reschedules them on other (or restarted)
  workers, and pages already written stay written. Tasks also get ``retries`` for transient
  errors (a page that fails for a bad file is reported as that file's failure after the retries).

Worker threads: dask starts worker processes with ``OMP_NUM_THREADS=1`` and runs one task per
worker thread, so on CPU workers each page runs single-threaded and a worker with ``nthreads=k``
infers ``k`` pages at once. Start GPU workers with one thread each (one worker per GPU).

dask.distributed is optional: it is imported only when a cluster is used.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from emseg.errors import EmsegError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'emseg[distributed]' (dask[distributed] and zarr)"
#: retries dask grants a page task that raised (a worker that dies does not use them up)
TASK_RETRIES = 2
#: input files a worker keeps open between pages
OPEN_FILES_PER_WORKER = 4

# (path, page_index, pages_total) after each page is written
PageProgress = Callable[[Path, int, int], None]


def _distributed():
    try:
        import distributed
    except ImportError:
        raise EmsegError(f"--scheduler needs dask.distributed, which is not installed: {INSTALL_HINT}") from None
    return distributed


def connect(scheduler: str, workers: int | None = None, *, timeout: str = "30s"):
    """A ``distributed.Client`` for ``scheduler`` (address, scheduler file or ``local``).

    ``timeout`` bounds the wait for a remote scheduler to answer.
    With ``local`` a LocalCluster of ``workers`` processes is started, the machine's cores shared
    among them as worker threads; it is closed with the client.
    """
    distributed = _distributed()
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if scheduler == "local":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = workers or max(1, cores // 2)
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=max(1, cores // n),
                                           processes=True, dashboard_address=":0")
        log.info("started a local dask cluster: %d worker process(es), %d thread(s) each, dashboard %s", n,
                 max(1, cores // n), cluster.dashboard_link)
        return distributed.Client(cluster, set_as_default=False)
    if workers is not None:
        log.warning("--workers is used only with --scheduler local; the cluster at %s has its own", scheduler)
    try:
        if scheduler.endswith(".json") and Path(scheduler).is_file():
            return distributed.Client(scheduler_file=scheduler, set_as_default=False, timeout=timeout)
        return distributed.Client(scheduler, set_as_default=False, timeout=timeout)
    except OSError as exc:
        raise EmsegError(f"{scheduler}: cannot reach the dask scheduler ({exc}); check the address "
                         "(tcp://HOST:PORT) and that the scheduler is running") from None


# ------------------------------------------------------------------ worker side

class _ModelPluginBody:
    """What :class:`ModelPlugin` does: holds the model (card JSON + safetensors bytes) and the
    Predictor options on every worker.

    Pickled once per worker by dask (also to workers that join or restart later). The network
    and its Predictor are built on the worker's first page and reused for all later ones.
    """

    def __init__(self, card_json: str, weights: bytes, options: dict[str, Any], name: str):
        self.card_json, self.weights, self.options, self.name = card_json, weights, options, name
        self._predictor = None
        self._sources: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"card_json": self.card_json, "weights": self.weights, "options": self.options, "name": self.name}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self, worker=None) -> None:  # dask calls this when the plugin is installed
        log.debug("emseg model plugin %s installed on %s", self.name, getattr(worker, "address", "?"))

    def teardown(self, worker=None) -> None:
        with self._lock:
            for source, _ in self._sources.values():
                source.close()
            self._sources.clear()
            self._predictor = None

    def predictor(self):
        """The worker's Predictor, built from the shipped weights on first use."""
        with self._lock:
            if self._predictor is None:
                from safetensors.torch import load as load_weights

                from emseg.model.card import ModelCard
                from emseg.model.modelfile import Model
                card = ModelCard.from_dict(json.loads(self.card_json))
                model = Model.new(card)
                model.net.load_state_dict(load_weights(self.weights), strict=True)
                self._predictor = model.predictor(**self.options)
                log.info("emseg: built %s predictor on %s", card.encoder, self._predictor.device)
            return self._predictor

    @contextlib.contextmanager
    def open_source(self, path: str, pixel_size_nm: float | None) -> Iterator[Any]:
        """An open ImageSource for ``path``; the last few files are kept open, never one in use."""
        from emseg.io.read import open_image
        key = (path, pixel_size_nm)
        with self._lock:
            entry = self._sources.get(key)
            if entry is not None:
                self._sources.move_to_end(key)
                entry[1] += 1
        if entry is None:
            source = open_image(path, pixel_size_nm=pixel_size_nm)
            with self._lock:
                entry = self._sources.get(key)
                if entry is None:
                    entry = self._sources[key] = [source, 1]
                else:  # another thread opened it meanwhile
                    entry[1] += 1
                    source.close()
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                idle = [k for k, (_, users) in self._sources.items() if users == 0]
                while len(self._sources) > OPEN_FILES_PER_WORKER and idle:
                    self._sources.pop(idle.pop(0))[0].close()


def __getattr__(name: str):
    """``ModelPlugin``: a dask ``WorkerPlugin`` made on first use, so that importing this module
    (as ``emseg predict --help`` does) does not import dask.distributed."""
    if name == "ModelPlugin":
        if name in globals():
            return globals()[name]
        WorkerPlugin = _distributed().diagnostics.plugin.WorkerPlugin
        cls = type("ModelPlugin", (_ModelPluginBody, WorkerPlugin), {"__module__": __name__, "__qualname__": name,
                                                                      "__doc__": _ModelPluginBody.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _predict_page(plugin_name: str, path: str, index: int, pixel_size_nm: float | None,
                  keep_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The task: labels ``(H, W)`` (and probabilities ``(K, H, W)`` float32) of one page of ``path``."""
    plugin = worker_plugin(plugin_name)
    predictor = plugin.predictor()
    with plugin.open_source(path, pixel_size_nm) as source:
        page, page_pixel_size = source.page(index), source.pixel_size_nm
    result = predictor.page_result(index, page, pixel_size_nm=page_pixel_size, keep_probabilities=keep_probabilities)
    return result.labels, result.probabilities


# ------------------------------------------------------------------ client side

@dataclasses.dataclass
class _FileJob:
    """One input being predicted: its open source, writers and pages submitted/written."""

    path: Path
    outputs: Any
    source: Any
    mask_writer: Any
    prob_writer: Any
    pages: int
    start: float
    slot: list = dataclasses.field(default_factory=list)  # [path, outcome] yielded in input order
    number: int = 0  # index among the inputs
    submitted: int = 0
    popped: int = 0
    error: BaseException | None = None
    preview: tuple | None = None

    def abort(self) -> None:
        for writer in (self.mask_writer, self.prob_writer):
            if writer is not None:
                writer.abort()


def output_paths(path: Path, outdir: Path, fmt: str = "tif"):
    """The :class:`emseg.infer.runner.OutputPaths` of an input, with ``.zarr`` mask/probabilities for ``fmt='zarr'``."""
    from emseg.infer.runner import OutputPaths
    outputs = OutputPaths.for_input(path, outdir)
    if fmt == "zarr":
        outputs = dataclasses.replace(outputs, mask=outputs.mask.with_suffix(".zarr"),
                                      probabilities=outputs.probabilities.with_suffix(".zarr"))
    elif fmt != "tif":
        raise ValueError(f"output format must be 'tif' or 'zarr', got {fmt!r}")
    return outputs


def check_options(model, options: dict[str, Any]):
    """A CPU Predictor of ``model``'s card with the run's ``options`` (no network): raises on a bad tile,
    overlap or batch size before anything is sent to the cluster."""
    import torch

    from emseg.infer.predictor import Predictor
    return Predictor(type(model)(torch.nn.Identity(), model.card), **{**options, "device": "cpu"})


def register_model(client, model, options: dict[str, Any]) -> str:
    """Ship ``model`` (weights, card) and the Predictor ``options`` to every worker once, as a
    :class:`ModelPlugin`; returns the plugin's name, which the tasks name to find it."""
    from safetensors.torch import save as save_weights
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    weights = save_weights(state)
    card_json = model.card.to_json()
    digest = hashlib.sha256(weights + card_json.encode() + json.dumps(options, sort_keys=True).encode())
    name = f"emseg-model-{digest.hexdigest()[:16]}"
    client.register_plugin(__getattr__("ModelPlugin")(card_json, weights, options, name), name=name)
    return name


def worker_plugin(name: str):
    """On a dask worker: the :class:`ModelPlugin` called ``name`` (installed by :func:`register_model`)."""
    from distributed import get_worker
    try:
        return get_worker().plugins[name]
    except KeyError:
        raise RuntimeError(f"emseg model plugin {name} is not installed on this worker") from None


def predict_files(client, model, paths: list[Path], outdir: Path, *, tile: int | None = None,
                  overlap: int | None = None, batch_size: int | str = 4, tta: bool = False,
                  device: str = "auto", pixel_size_nm: float | None = None, probabilities: bool = False,
                  overlay: bool = True, overwrite: bool = False, fmt: str = "tif", window: int | None = None,
                  progress: PageProgress | None = None,
                  follow_label_offset: bool | None = None) -> Iterator[tuple[Path, Any]]:
    """Predict ``paths`` into ``outdir`` on the cluster of ``client``; yield ``(path, outcome)`` per input.

    ``outcome`` is a :class:`emseg.infer.runner.FileResult` ("written" or "skipped") or the
    :class:`emseg.errors.EmsegError` that made this input fail; inputs are yielded in order.
    Outputs are those of :func:`emseg.infer.runner.predict_file` (``fmt='zarr'``: ``NAME_mask.zarr``,
    ``NAME_probs.zarr``), written atomically by the client. Any other error (or an interrupt)
    aborts all unfinished outputs, cancels the submitted pages and is raised.
    """
    options = dict(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta, device=device,
                   follow_label_offset=follow_label_offset)
    check_options(model, options)
    fmt_paths = [output_paths(path, outdir, fmt) for path in paths]  # checks fmt before any work
    name = register_model(client, model, options)
    if window is None:
        threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        window = max(2, 2 * threads)
    run = _ClusterRun(client, model, name, list(zip(paths, fmt_paths)), outdir, window=window,
                      pixel_size_nm=pixel_size_nm, probabilities=probabilities, overlay=overlay,
                      overwrite=overwrite, progress=progress)
    try:
        yield from run.outcomes()
    finally:
        run.close()


class _ClusterRun:
    """The client's side of :func:`predict_files`: inputs opened one after the other, at most ``window``
    pages in flight, pages written in order as their results come, outcomes yielded in input order."""

    def __init__(self, client, model, name: str, inputs: list, outdir: Path, *, window: int,
                 pixel_size_nm: float | None, probabilities: bool, overlay: bool, overwrite: bool,
                 progress: PageProgress | None):
        self.client, self.model, self.name, self.outdir, self.window = client, model, name, outdir, window
        self.pixel_size_nm, self.probabilities, self.overlay = pixel_size_nm, probabilities, overlay
        self.overwrite, self.progress = overwrite, progress
        self.distributed = _distributed()
        self.run_id = uuid.uuid4().hex[:8]
        self.num_classes = model.card.num_classes
        self.meta = {"classes": list(model.card.classes)}
        self.inputs = iter(enumerate(inputs))
        self.slots: collections.deque[list] = collections.deque()  # [path, outcome or None], in input order
        self.jobs: list[_FileJob] = []  # open inputs, in input order
        self.inflight: collections.deque = collections.deque()  # (job, page, future), in submission order

    def outcomes(self) -> Iterator[tuple[Path, Any]]:
        while True:
            self._fill()
            while self.slots and self.slots[0][1] is not None:
                yield tuple(self.slots.popleft())
            if not self.inflight:
                break
            job, i, future = self.inflight.popleft()
            self._collect(job, i, future)
            del future
            if job.popped == job.pages:
                self._finish(job)
        while self.slots:
            yield tuple(self.slots.popleft())

    def close(self) -> None:
        """Cancel what is still in flight, abort unfinished outputs, remove the model from the workers."""
        for _, _, future in self.inflight:
            future.cancel()
        for job in self.jobs:
            job.abort()
            job.source.close()
        try:
            self.client.unregister_worker_plugin(self.name)
        except Exception as exc:  # noqa: BLE001 - best effort; the cluster may be gone
            log.debug("could not unregister %s: %s", self.name, exc)

    def _open_next(self) -> _FileJob | None:
        """Open the next input that needs work; skipped and unreadable ones only get their outcome."""
        from emseg.infer.preprocess import check_rescale
        from emseg.infer.runner import FileResult, missing_outputs, remake_overlay
        from emseg.io.read import open_image
        for number, (path, outputs) in self.inputs:
            slot = [path, None]
            self.slots.append(slot)
            missing = [] if self.overwrite else missing_outputs(outputs, probabilities=self.probabilities,
                                                                overlay=self.overlay)
            if not self.overwrite and not missing:
                log.info("%s: skipped, %s exists (use --overwrite to redo)", path, outputs.mask)
                slot[1] = FileResult(path, "skipped", outputs)
                continue
            try:
                if missing == [outputs.overlay] and remake_overlay(path, outputs, self.model.card.classes,
                                                                   self.pixel_size_nm):
                    log.info("%s: %s exists; made the missing %s", path, outputs.mask, outputs.overlay)
                    slot[1] = FileResult(path, "completed", outputs)
                    continue
                source = open_image(path, pixel_size_nm=self.pixel_size_nm)
            except EmsegError as exc:
                slot[1] = exc
                continue
            try:
                check_rescale(str(path), source.shape[1:], source.pixel_size_nm, self.model.card.pixel_size_nm,
                              channels=self.num_classes + 1)
            except EmsegError as exc:
                source.close()
                slot[1] = exc
                continue
            job = self._open_writers(path, outputs, source, slot, number)
            self.jobs.append(job)
            return job
        return None

    def _open_writers(self, path: Path, outputs, source, slot: list, number: int) -> _FileJob:
        """The input's job with its mask (and probability) writer, each writing to a temporary name."""
        from emseg.infer.predictor import labels_dtype
        from emseg.io.zarr_store import stack_writer
        n = self.num_classes
        pages, height, width = source.shape
        page_shape = (pages, height, width) if source.is_stack else (height, width)
        prob_shape = (pages, n, height, width) if source.is_stack else (n, height, width)
        common = dict(pixel_size_nm=source.pixel_size_nm, metadata=self.meta, z_spacing_nm=source.z_spacing_nm)
        mask_writer = prob_writer = None
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
            mask_writer = stack_writer(outputs.mask, shape=page_shape, dtype=labels_dtype(n), **common)
            if self.probabilities:
                prob_writer = stack_writer(outputs.probabilities, shape=prob_shape, dtype=np.float32, **common)
        except BaseException:
            if mask_writer is not None:
                mask_writer.abort()
            source.close()
            raise
        return _FileJob(path, outputs, source, mask_writer, prob_writer, pages, time.perf_counter(),
                        slot=slot, number=number)

    def _fill(self) -> None:
        """Submit pages (opening inputs as needed) until ``window`` are in flight or nothing is left."""
        while len(self.inflight) < self.window:
            jobs = self.jobs
            job = jobs[-1] if jobs and jobs[-1].submitted < jobs[-1].pages else None
            if job is None and self._open_next() is None:
                return
            job = self.jobs[-1]
            i = job.submitted
            future = self.client.submit(_predict_page, self.name, str(job.path), i, self.pixel_size_nm,
                                        self.probabilities, key=f"emseg-{self.run_id}-{job.number}-{i}",
                                        retries=TASK_RETRIES, pure=False)
            self.inflight.append((job, i, future))
            job.submitted += 1

    def _collect(self, job: _FileJob, i: int, future) -> None:
        """Write page ``i``'s result (the pages of a job come in order), or record why it failed."""
        job.popped += 1
        if job.error is not None:
            future.cancel()
            return
        try:
            labels, probs = future.result()
        except (EmsegError, self.distributed.KilledWorker) as exc:
            job.error = exc if isinstance(exc, EmsegError) else EmsegError(
                f"{job.path}: page {i + 1} of {job.pages} failed on the cluster: {exc}")
            return
        job.mask_writer.write_page(labels)
        if job.prob_writer is not None:
            job.prob_writer.write_page(probs)
        if self.overlay and i == job.pages // 2:
            job.preview = (job.source.page(i), labels)
        if self.progress is not None:
            self.progress(job.path, i, job.pages)

    def _finish(self, job: _FileJob) -> None:
        """Close an input whose pages are all back: its outputs committed (the mask last), or aborted."""
        from emseg.infer.runner import FileResult
        from emseg.io.write import write_overlay_png
        self.jobs.remove(job)
        try:
            if job.error is None:
                try:  # the mask last: once it exists, so do the input's other outputs
                    if job.prob_writer is not None:
                        job.prob_writer.close()
                    if job.preview is not None:
                        write_overlay_png(job.outputs.overlay, *job.preview, class_names=self.model.card.classes)
                    job.mask_writer.close()
                except BaseException:
                    job.abort()
                    raise
                _, height, width = job.source.shape
                job.slot[1] = FileResult(job.path, "written", job.outputs, job.pages,
                                         time.perf_counter() - job.start, job.pages * height * width / 1e6)
            else:
                job.abort()
                job.slot[1] = job.error
        finally:
            job.source.close()


__all__ = ["connect", "predict_files", "output_paths", "register_model",
           "check_options", "worker_plugin"]
