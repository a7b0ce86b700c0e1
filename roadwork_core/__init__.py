"""roadwork core: pure Python + PyTorch. Never imports dagster."""

import atexit
import gc

__version__ = "0.1.0"


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


atexit.register(_skip_the_exit_collections)
