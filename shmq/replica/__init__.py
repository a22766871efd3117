"""Replica processes: host partition replicas, copy leaders, lead (see process.py)."""
