import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("fpgrad", deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fpgrad")

# Tiny matrices run faster on one thread, and a loaded 2-core machine punishes oversubscription.
import torch  # noqa: E402

torch.set_num_threads(1)
# ... and the same for the subprocesses tests start (the CLI, studies, torchrun): OpenMP threads spinning on
# busy cores made a 5 s report take over 2 minutes
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
