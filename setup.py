"""Build script: the package plus (added in the csrc issue) the compiled LTG extension."""

from setuptools import setup

setup()
