"""roadwork core: pure Python + PyTorch. Never imports dagster."""

import atexit
import gc

__version__ = "0.1.0"

# CPython's default thresholds, which `_fewer_young_collections` leaves alone when a program has set its own.
_DEFAULT_GC_THRESHOLD = (700, 10, 10)
YOUNG_GC_THRESHOLD = 7000


def _fewer_young_collections() -> None:
    """Collect the youngest generation every 7,000 net allocations of container objects instead of 700.

    A roadwork process imports torch, torchvision, timm, torchmetrics, dagster and mlflow: about a
    million objects, all long-lived. With the default threshold the collector runs thousands of young
    collections and, as the heap grows, repeated full ones over everything imported so far: 12-15 % of
    the import CPU of a fresh process on the CI machine (the training stack + the definitions: 6.7-7.4 s
    at 700, 5.8-6.6 s at 7,000; `python -m bench.bench_gc_threshold`). Every run worker, torchrun rank,
    code server, CLI call and test worker pays those imports. The older generations keep their
    thresholds (they count young collections, so they too run 10x less often); cyclic garbage waits at
    most 7,000 allocations longer. Left alone when the program changed the thresholds itself."""
    if gc.get_threshold() == _DEFAULT_GC_THRESHOLD:
        gc.set_threshold(YOUNG_GC_THRESHOLD, *_DEFAULT_GC_THRESHOLD[1:])


def _skip_the_exit_collections() -> None:
    """At interpreter exit, move every live object to the garbage collector's permanent generation
    (`gc.freeze`), so that the collections CPython runs while finalizing do not traverse them.

    A process that has imported torch, torchmetrics, timm, dagster and mlflow holds millions of objects;
    those collections took ~2.4 s of its exit (py-spy --native: `gc_collect_main`), paid by every run
    worker, `dagster` / `roadwork` CLI call, code server and torchrun rank. Objects are still freed by
    reference counting as the modules are torn down, atexit handlers and weakref finalizers still run;
    only reference cycles alive at exit are left to the OS, whose finalizers Python does not promise to
    run at exit anyway. Registered on first import, so it runs after the handlers registered later."""
    gc.freeze()


_fewer_young_collections()
atexit.register(_skip_the_exit_collections)
