"""Cross-modal retrieval evaluation: the metrics and the encoding of a dataset
(:mod:`cdds_fast.eval.retrieval`), and the ``cdds-fast eval`` command
(:mod:`cdds_fast.eval.command`)."""
