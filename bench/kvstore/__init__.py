"""Benchmark of the KV store's data paths against memcpy, sockets, Redis and Ray (see __main__)."""
