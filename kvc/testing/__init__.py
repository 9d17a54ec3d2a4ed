"""Test support shared by the unit tests (``tests/``) and the cluster tests (``e2e/``).

``corpus``: the bad-input corpus (``tests/corpus/*.yaml``) and the objects its cases create;
``strategies``: hypothesis strategies for pods and their annotations; ``fileserver``: a
loopback HTTP(S) file server. Nothing here is imported by KVC's components; ``strategies``
needs hypothesis (the ``dev`` extra).
"""
