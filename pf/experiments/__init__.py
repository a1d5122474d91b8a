"""The studies that write the reports (RESULTS.md, docs/*.md), and the framework they share.

Studies, each its settings, stages, statements and report: ``evidence`` (the comparison, v2:
RESULTS.md), ``diagnostics`` (on the first version's kept weights), ``feature_spaces`` (the
committed classifiers), ``reproduce`` (the comparison's first version), ``findings``, ``repa``
and ``t2i``; run ``python -m pf.experiments.<study>``.

Framework, bottom up: ``records`` (keys, cached JSON results, a directory lock), ``stages``
(cached, resumable stages and their runner), ``trajectories`` (training runs resumed by step),
``comparison`` (the settings and arms the comparison's studies share), ``common`` (its trained
runs, feature classifier and held-out reference), ``curves`` (evaluation points and curves),
``spaces`` (points measured in the committed feature spaces, paired per training seed),
``summary`` (report numbers), ``plots`` (shared figure helpers) and ``command`` (a study's
command line: toy sizes, run then report).
"""
