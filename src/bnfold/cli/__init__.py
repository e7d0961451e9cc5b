"""The ``bnfold`` command: arguments (:mod:`.main`), loading the model (:mod:`.loading`, :mod:`.zoo`), and
the run (:mod:`.run`)."""
