"""The worker process of a Disco `ProcessSession` opened with
``entrypoint="atom_tvm.runtime.disco_worker"``: ``python -m atom_tvm.runtime.disco_worker <worker_id>
<num_workers> <num_groups> <read_fd> <write_fd>``, started by the controller (tvm's process_pool).

TVM's own entry point (tvm.exec.disco_worker) only imports tvm, which in 0.27 leaves Disco's Python
side unregistered (see `tvm_libs.load_disco`): its workers fail `Session.import_python_module`, and
they lack the NCCL collective, which the apache-tvm wheel does not build (atom-tvm does). This one
loads both, then serves the controller. Runtime-only: it never imports tvm.relax.
"""

from __future__ import annotations

import sys

import tvm_ffi

from atom_tvm.errors import UserError
from atom_tvm.runtime.tvm_libs import load_disco, load_nccl


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print("usage: python -m atom_tvm.runtime.disco_worker <worker_id> <num_workers> <num_groups> "
              "<read_fd> <write_fd>", file=sys.stderr)
        return 2
    worker_id, num_workers, num_groups, read_fd, write_fd = (int(arg) for arg in argv)
    load_disco()
    try:
        load_nccl()
    except UserError:
        pass  # no GPU or no NCCL: the controller, on this same host, reports why when it calls init_ccl
    serve = tvm_ffi.get_global_func("runtime.disco.WorkerProcess")
    try:
        serve(worker_id, num_workers, num_groups, read_fd, write_fd)
    except (OSError, KeyboardInterrupt):
        pass  # the controller closed the pipes or was interrupted: the session is over
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
