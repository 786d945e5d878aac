"""The systems pdserve is compared with, started by the benchmark harness on this machine."""
