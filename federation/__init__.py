"""aifed's shared core: the job model, contracts, errors, configuration, security and journal."""

import os

# gRPC's fork handlers make a forked child abort before it can exec ("Check failed: next_worker->state ==
# KICKED"), and hubs fork to start jobs. aifed never forks to run gRPC in the child, so they are not needed.
# This must be set before grpc is first imported; every aifed module imports this package first.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

__version__ = "0.1.0"
