"""Tensor-parallel worker groups: the driver (rank 0) spawns shard ranks 1..N-1 (`group`), sends
each engine step to them as one typed message (`step_message`), and the shards run the model on
it in lock-step (`shard`). Nothing is imported here eagerly: the model runner imports
`step_message` while `shard` imports the model runner."""
