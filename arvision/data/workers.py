"""DataLoader worker set-up shared by every loader that runs while a training run can be pre-empted.

A cluster scheduler, and torchrun when it shuts down, send SIGTERM to every process of a rank's process group,
DataLoader workers included; a worker that dies of it makes the main process fail ("DataLoader worker ... is killed
by signal: Terminated") before it can save. Ctrl-C sends SIGINT to the whole foreground group the same way. The main
process decides what a stop means (the Trainer saves at the next step boundary), so a worker ignores SIGINT, and
SIGTERM from anyone but its own main process. SIGTERM from the main process still ends it: that is how the loader
(``Process.terminate``, and multiprocessing at interpreter exit, which then waits for the worker) shuts workers down,
so ignoring it too would hang the exit. Telling the two apart needs the sender's pid: a thread of the worker takes
SIGTERM with ``sigwaitinfo`` (Linux; elsewhere workers keep torch's default handling).

    DataLoader(dataset, num_workers=2, worker_init_fn=ignore_stop_signals)
"""
from __future__ import annotations

import os
import signal
import threading


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of a DataLoader: SIGINT and a SIGTERM sent to the process group are for the main process,
    not for its workers; a SIGTERM from the main process itself ends the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    # Blocked here before any other thread of the worker exists (threads inherit the mask), so only the waiting
    # thread ever takes a SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), name="arvision-sigterm", daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what torch's own worker handler does for its main process's SIGTERM
