"""What the test modules share, imported as ``from helpers.<module> import ...`` (``tests/`` is on ``sys.path``
through its ``conftest.py``), never from ``conftest`` or from another test module.

- :mod:`helpers.dense`: dense references: the Hessian, ``mu (H + mu I)^-1 v``, SPD systems, error norms.
- :mod:`helpers.finite_differences`: a Hessian-vector product against central differences of the gradient.
- :mod:`helpers.models`: tiny backbones, pretext methods and tasks for the bilevel and pretext tests.
- :mod:`helpers.ranks`: run a function on several gloo processes and compare what the ranks return.
"""
