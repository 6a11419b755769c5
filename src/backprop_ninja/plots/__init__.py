"""The pictures: the loss curve a run writes, a trained run's diagnostics and attention maps, and
the lecture's dlogits. Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so
nothing global changes and no display is needed; every PNG goes through ``figure.save``."""
