"""Learning: the lecture's exercises as starter files (``exercises``), the checker that grades a
learner's backward (``checker``) with hints for the classic mistakes (``hints``), and pictures
(``plots``)."""
