"""The `shmq` command."""
