import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster on 127.0.0.1 (tests/test_distributed*.py): a head without CPUs (the
    driver's node) and two one-CPU worker nodes. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every
    node on the loopback address."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from peers import require

    ray = require("ray")
    from ray.cluster_utils import Cluster

    store = 80 * 2**20
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": store})  # fmt: skip
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=store)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
