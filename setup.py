# Only here because pyproject.toml alone cannot carry cffi_modules.
from setuptools import setup

setup(cffi_modules=["shmq/native/build.py:ffibuilder"])
