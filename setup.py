"""Builds distgrad's optional C kernels (the rest of the metadata is in pyproject.toml).

``optional=True``: without a C compiler the install still succeeds and distgrad
uses its pure-torch path (same results, slower server commits).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "distgrad._ext.kernels",
            sources=["src/distgrad/_ext/kernels.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
