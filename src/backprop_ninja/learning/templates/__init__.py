"""The exercises' template files. Each is the solution, with every answer fenced between
``# BLANK d<name>: <forward line>`` and ``# END`` comments, from which ``exercises`` renders the
learner's starter (each fence replaced by a blank) and the solution (fences dropped). Exercise
1's code is ``checking.lecture``'s, the reference the checker proves (a test keeps them equal)."""
