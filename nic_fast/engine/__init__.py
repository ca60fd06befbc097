"""Engines stream one slide's tiles through read → patchify → encode → scatter → write.

:mod:`nic_fast.engine.base` holds what they share; :mod:`nic_fast.engine.cpu` runs on
the host, :mod:`nic_fast.engine.cuda` on one GPU (imported only where a GPU runs).
"""
