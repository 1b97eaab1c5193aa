"""Building blocks of batch annotation (``cvserve.annotation.job``).

``inputs`` expands folders, globs, path lists and COCO image lists; ``journal`` is the
append-only, crash-safe record of finished images; ``worker`` turns image paths into
journal records (read, decode, predict, render); ``predictors`` runs workers in-process
or against a server; ``coco`` builds the COCO results and images files from the journal.
"""
