"""The ('data',) mesh: its shardings, batch sizes rounded to the device count, process-0-first."""

import jax
import numpy as np

from easunet_jax import parallel


def test_shardings_split_the_batch_and_replicate_the_state():
  mesh = parallel.make_mesh()
  assert mesh.size == jax.device_count() == 4
  data, replicated = parallel.shardings(mesh)
  batch = jax.device_put(np.zeros((8, 3), np.float32), data)
  assert {shard.data.shape for shard in batch.addressable_shards} == {(2, 3)}
  state = jax.device_put(np.zeros((8, 3), np.float32), replicated)
  assert {shard.data.shape for shard in state.addressable_shards} == {(8, 3)}


def test_batch_sizes_round_up_to_the_device_count():
  mesh = parallel.make_mesh()
  assert [parallel.round_to_devices(n, mesh) for n in (1, 4, 5, 16)] == [4, 4, 8, 16]
  assert parallel.round_to_devices(5, parallel.make_mesh(jax.devices()[:1])) == 5


def test_process_0_first_runs_the_block_once_in_one_process():
  ran = []
  with parallel.process_0_first('test'):
    ran.append(jax.process_index())
  assert ran == [0]
