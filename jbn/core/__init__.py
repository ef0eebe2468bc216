"""The functional core: pure BatchNorm maths on arrays, no framework modules.

``normalization`` (``batch_norm``, ``normalize``, ``init_params``), ``statistics``
(moments, merged across devices), ``running_stats`` (the running averages),
``renorm`` (Batch Renormalization) and ``validation`` (argument checks).
Imports only JAX and `jbn.native` (the one-read statistics kernel on the
CPU); everything else in jbn builds on it. The public names are re-exported
at the top, ``jbn.batch_norm`` and so on.
"""
