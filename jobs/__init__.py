"""Ray entrypoints (installed as ``otmel.jobs``).

Importing the package sets one Ray Data default for this process's jobs, before Ray Data is
imported (it reads it at import; a value the user set is kept):

``RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S`` (Ray 2.60: 180 s). A running dataset sends the
cluster's Ray Data autoscaling coordinator its resource request every 10 s, and the
coordinator divides the cluster's CPUs between the live requests. A driver that dies (killed,
its node lost, out of memory) never cancels its request: for the request's lifetime every
other Ray Data job on the cluster ran on a share of the CPUs as if the dead job still ran.
Measured on the 2-core test machine, a one-worker training run with Ray Data preprocessing
that takes 16-17 s took 54 s and 60 s in the two minutes after a link job's driver was
SIGKILLed; with the requests of the killed driver expiring after 20 s, 29 s and then 17 s.
"""

import os

#: how long a job's Ray Data resource request outlives its last refresh (3 refreshes)
REQUEST_EXPIRE_ENV = "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S"
REQUEST_EXPIRE_S = 30

os.environ.setdefault(REQUEST_EXPIRE_ENV, str(REQUEST_EXPIRE_S))
