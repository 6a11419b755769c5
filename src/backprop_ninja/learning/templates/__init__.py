"""The exercises' template files. Each is the solution, with every answer fenced between
``# BLANK d<name>: <forward line>`` and ``# END`` comments: a valid module whose code is the
reference solution (``checking.atomic`` runs exercise 1's), and from which ``exercises`` renders
the learner's starter (each fence replaced by a blank) and the solution (fences dropped)."""
