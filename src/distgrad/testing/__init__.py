"""Test harnesses that are useful outside the test suite too.

:mod:`distgrad.testing.netns` builds a cluster of "hosts" on one Linux machine out of
network namespaces (root and iproute2 needed), to try ``distgrad serve``/``work``, a
multi-node Ray cluster or a Spark standalone cluster across real network stacks, under
bandwidth caps and link failures.
"""
