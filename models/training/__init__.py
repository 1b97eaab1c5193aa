"""Parts of the training engine (:mod:`models.train`): options, solver, history."""
