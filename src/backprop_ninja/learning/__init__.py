"""Learning: the exercises as starter files and notebooks, and the checker that grades them.

Bottom up: ``exercises`` renders the templates; ``learner`` runs the learner's code;
``grading`` grades what it returns (hints from ``hints`` and ``hints_zoo``); ``tasks``
and ``zoo_exercises`` set up each exercise's problem and reference; ``race`` is exercise 4's
training run; ``notebook_build`` writes notebooks, ``notebook_run`` grades a saved one headless
and ``notebook`` is the ``check`` a notebook calls; ``checker`` dispatches a file to the right
path, and ``sandbox`` runs it in a child process. ``plots`` draws pictures.
"""
