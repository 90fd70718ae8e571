"""Disco plumbing for tensor parallelism: atom-tvm's CPU collective (`atom_cpu`) in ThreadedSessions,
`tvm_libs.load_disco` after a plain `import tvm`, the ProcessSession worker entry point, and (GPU)
TVM's NCCL collective as atom-tvm builds it.

References are numpy float64 sums of the arrays each worker was given.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm_ffi

from atom_tvm.runtime.tvm_libs import init_ccl, load_disco

WORKER_ENTRYPOINT = "atom_tvm.runtime.disco_worker"
REDUCE_KINDS = {"sum": 0, "prod": 1, "min": 2, "max": 3, "avg": 4}
# PROCESS_SESSION_END: a ProcessSession's workers end when the last reference to it goes (its DRefs
# hold it too). Session.shutdown() would close the pipes while the session's cached remote functions
# live on, and freeing one of them later writes to a closed pipe, which aborts the process.


@pytest.fixture(scope="module")
def disco():
    return load_disco()


def threaded_session(disco, num_workers: int):
    session = disco.ThreadedSession(num_workers)
    init_ccl(session, "cpu", num_workers)
    return session


def put_per_worker(session, arrays: list[np.ndarray]):
    """A DRef holding arrays[k] on worker k."""
    dref = session.empty(arrays[0].shape, str(arrays[0].dtype))
    for worker, array in enumerate(arrays):
        dref.debug_copy_from(worker, array)
    return dref


def allreduce(session, src, dst, kind: str) -> None:
    """The global runtime.disco.allreduce on every worker, called as Session.allreduce calls it."""
    session.get_global_func("runtime.disco.allreduce")(src, tvm_ffi.Shape([REDUCE_KINDS[kind]]), True, dst)


def gathered(dref, num_workers: int) -> list[np.ndarray]:
    return [dref.debug_get_from_remote(worker).numpy() for worker in range(num_workers)]


@pytest.mark.parametrize("num_workers", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_allreduce_sum_is_the_sum_of_every_workers_array(disco, num_workers, dtype):
    rng = np.random.default_rng()
    arrays = [rng.standard_normal((37, 11)).astype(dtype) for _ in range(num_workers)]
    session = threaded_session(disco, num_workers)
    src = put_per_worker(session, arrays)
    dst = session.empty((37, 11), dtype)
    allreduce(session, src, dst, "sum")
    expected = np.sum([a.astype(np.float64) for a in arrays], axis=0)
    results = gathered(dst, num_workers)
    # float32 sums are rounded once, and so are float16 ones: within half a unit in the last place
    rtol = 2.0**-24 if dtype == "float32" else 2.0**-11
    np.testing.assert_allclose(results[0].astype(np.float64), expected, rtol=rtol, atol=2.0**-25)
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])  # every worker holds the same bits


@pytest.mark.parametrize("kind", ["prod", "min", "max", "avg"])
def test_allreduce_other_kinds_and_in_place(disco, kind):
    rng = np.random.default_rng()
    arrays = [rng.uniform(0.5, 2.0, (64,)).astype("float32") for _ in range(3)]
    session = threaded_session(disco, 3)
    buffer = put_per_worker(session, arrays)
    allreduce(session, buffer, buffer, kind)  # recv is send: NCCL allows it, so must we
    stacked = np.stack([a.astype(np.float64) for a in arrays])
    expected = {"prod": stacked.prod(0), "min": stacked.min(0), "max": stacked.max(0), "avg": stacked.mean(0)}[kind]
    for result in gathered(buffer, 3):
        np.testing.assert_allclose(result, expected, rtol=2.0**-23)


def test_allreduce_int32(disco):
    rng = np.random.default_rng()
    arrays = [rng.integers(-1000, 1000, (50,), dtype=np.int32) for _ in range(2)]
    session = threaded_session(disco, 2)
    dst = session.empty((50,), "int32")
    allreduce(session, put_per_worker(session, arrays), dst, "sum")
    for result in gathered(dst, 2):
        np.testing.assert_array_equal(result, arrays[0].astype(np.int64) + arrays[1])


@pytest.mark.parametrize("num_workers", [2, 3])
def test_broadcast_from_worker0_gives_every_worker_its_array(disco, num_workers):
    source = np.random.default_rng().standard_normal((5, 7)).astype("float32")
    session = threaded_session(disco, num_workers)
    # copy_to_worker_0 leaves the send buffer undefined on the other workers, as NCCL expects
    out = session.broadcast(source)
    for result in gathered(out, num_workers):
        np.testing.assert_array_equal(result, source)


def test_allgather_concatenates_in_worker_order(disco):
    rng = np.random.default_rng()
    arrays = [rng.standard_normal((4, 3)).astype("float32") for _ in range(3)]
    session = threaded_session(disco, 3)
    dst = session.empty((12, 3), "float32")
    session.allgather(put_per_worker(session, arrays), dst)
    for result in gathered(dst, 3):
        np.testing.assert_array_equal(result, np.concatenate(arrays))


def test_relax_ccl_allreduce_runs_on_two_workers(disco, tmp_path):
    import tvm
    from tvm import relax

    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            doubled = bb.emit(relax.op.multiply(x, relax.const(2.0, "float32")))
            out = bb.emit_output(relax.op.ccl.allreduce(doubled, "sum"))
        bb.emit_func_output(out)
    library = tmp_path / "allreduce.so"
    tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})).export_library(library)

    rng = np.random.default_rng()
    arrays = [rng.standard_normal((4, 8)).astype("float32") for _ in range(2)]
    session = threaded_session(disco, 2)
    module = session.load_vm_module(str(library))
    result = module["main"](put_per_worker(session, arrays))
    expected = 2.0 * (arrays[0].astype(np.float64) + arrays[1])
    for got in gathered(result, 2):
        np.testing.assert_allclose(got, expected, rtol=2.0**-23)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("runtime_only", ["0", "1"])
def test_load_disco_after_a_plain_import_tvm(runtime_only):
    # import tvm sets tvm.runtime.disco up before it loads Disco's library (runtime-only TVM never
    # loads it); load_disco must leave a package that opens sessions, without the compiler.
    proc = run_python("""
        import sys
        import numpy as np
        import tvm
        from atom_tvm.runtime.tvm_libs import init_ccl, load_disco
        disco = load_disco()
        assert tvm.runtime.disco is disco
        session = disco.ThreadedSession(2)
        init_ccl(session, "cpu", 2)
        out = session.broadcast(np.arange(6, dtype="float32"))
        print(out.debug_get_from_remote(1).numpy().tolist())
        print(any(name.startswith("tvm.relax") for name in sys.modules))
    """, TVM_USE_RUNTIME_LIB=runtime_only)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]"
    if runtime_only == "1":
        assert lines[1] == "False"  # runtime-only: tvm.relax never imported


def test_process_session_workers_run_python_and_refuse_the_cpu_collective(disco):
    session = disco.ProcessSession(2, entrypoint=WORKER_ENTRYPOINT)
    # TVM's own worker entry point cannot do this under 0.27 (Disco's Python side is unregistered)
    session.import_python_module("json")
    worker_ids = session.get_global_func("runtime.disco.worker_id")()
    assert tuple(worker_ids.debug_get_from_remote(1)) == (1,)
    with pytest.raises(ValueError, match="ThreadedSession"):
        init_ccl(session, "cpu", 2)
    del session, worker_ids  # see PROCESS_SESSION_END
    gc.collect()


def test_mismatched_buffers_stop_every_worker_with_the_reason():
    # An exception on a ThreadedSession worker ends the process (TVM's worker threads do not catch);
    # the collective must not leave the other workers waiting, and must say what was wrong.
    proc = run_python("""
        import numpy as np
        import tvm_ffi
        from atom_tvm.runtime.tvm_libs import init_ccl, load_disco
        session = load_disco().ThreadedSession(2)
        init_ccl(session, "cpu", 2)
        src = session.empty((4,), "float32")
        dst = session.empty((5,), "float32")
        session.get_global_func("runtime.disco.allreduce")(src, tvm_ffi.Shape([0]), True, dst)
        session.sync_worker_0()
    """)
    assert proc.returncode != 0
    assert "atom_cpu.allreduce" in proc.stderr and "shape and dtype of `send`" in proc.stderr


def _gpu_count() -> int:
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in proc.stdout.splitlines() if line.startswith("GPU "))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nccl_allreduce_across_gpu_worker_processes(disco, dtype):
    num_gpus = _gpu_count()
    if num_gpus < 2:
        pytest.skip(f"needs 2 GPUs, this host has {num_gpus}")
    rng = np.random.default_rng()
    arrays = [rng.standard_normal((129, 65)).astype(dtype) for _ in range(num_gpus)]
    session = disco.ProcessSession(num_gpus, entrypoint=WORKER_ENTRYPOINT)
    init_ccl(session, "cuda", num_gpus)  # worker k on GPU k, now the workers' default device
    copy = session.get_global_func("runtime.TVMTensorCopyFromTo")
    host = put_per_worker(session, arrays)
    src = session.empty((129, 65), dtype)
    copy(host, src)
    dst = session.empty((129, 65), dtype)
    allreduce(session, src, dst, "sum")
    back = put_per_worker(session, [np.zeros_like(a) for a in arrays])
    copy(dst, back)
    results = gathered(back, num_gpus)
    del session, copy, host, src, dst, back  # see PROCESS_SESSION_END
    gc.collect()
    expected = np.sum([a.astype(np.float64) for a in arrays], axis=0)
    # NCCL sums in the element type, in an order of its own: a few roundings
    rtol = 1e-5 if dtype == "float32" else 4 * 2.0**-11
    for result in results:
        np.testing.assert_allclose(result.astype(np.float64), expected, rtol=rtol, atol=rtol * num_gpus)
