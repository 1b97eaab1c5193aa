"""Parts of the training engine (:mod:`cvserve.models.training.engine`): options, solver, history."""
