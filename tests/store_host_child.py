"""One host of the two-process store test (tests/test_store.py): reads its rows of a token store, assembles the
global batches as the training loop does (``jax.make_array_from_process_local_data`` over a mesh of both
processes' devices), gathers them back to numpy and, on process 0, saves them.

    python tests/store_host_child.py STORE PORT PROCESS_ID OUT.npz SEQ_LEN GLOBAL_BATCH SEED NUM_BATCHES
"""

import sys

import jax
import numpy as np


def main(store, port, pid, out, seq_len, global_batch, seed, n):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils

    from fairy2i_jax.data import open_store, train_dataset
    from fairy2i_jax.sharding import make_mesh
    from fairy2i_jax.training.reports import global_batch as assemble
    from fairy2i_jax.training.step import batch_sharding

    corpus = open_store(store, mmap=False)
    it = iter(train_dataset(corpus, seq_len=seq_len, global_batch=global_batch, seed=seed,
                            process_index=jax.process_index(), process_count=jax.process_count()))
    shape = (global_batch, seq_len)
    sharding = batch_sharding(make_mesh(jax.device_count(), 1, 1), shape)
    ids, labels = [], []
    for _ in range(n):
        batch = assemble(next(it), sharding, shape)
        ids.append(multihost_utils.process_allgather(batch["input_ids"], tiled=True))
        labels.append(multihost_utils.process_allgather(batch["labels"], tiled=True))
    local_rows = n * global_batch // 2
    assert corpus.tokens.bytes_read == local_rows * seq_len * corpus.tokens.file_dtype.itemsize  # own rows only
    if jax.process_index() == 0:
        np.savez(out, input_ids=np.stack(ids), labels=np.stack(labels))
    jax.distributed.shutdown()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]))
