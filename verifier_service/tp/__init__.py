"""Tensor parallelism for the verifier: sharding the target across the ranks of one replica.

``sharding.shard_target`` splits a loaded target in place (pure torch, Megatron style);
``group.TPGroup`` runs one sharded engine per rank as Ray actors in lockstep. See
``verifier_service/DESIGN.md``, section "Tensor parallelism".
"""
