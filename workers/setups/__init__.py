"""Deployment setups measured on a worker: trials (``trial.run_trial``).

Plain Python, as the rest of ``workers/``: the control plane builds a ``TrialSpec``
and stores the ``TrialResult`` a worker sends back.
"""
