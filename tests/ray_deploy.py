"""The Ray Serve deployment tests/serving/test_served.py talks to, in a process of its own (Ray in a pytest worker's process
left MuJoCo's renderer unable to start there later): a local Ray instance, one app per limit profile of
tests/served.py behind one proxy, each replica running `tests.served.switchable(CHECKPOINT)`. Prints one JSON line
(the port and each profile's path) once every replica has been reached through the proxy, then serves until
SIGTERM, then stops in order (tests/serving/test_served.py kills its process group instead: Ray's orderly stop takes a
minute on 2 cores).

    python tests/ray_deploy.py CHECKPOINT PORT
"""

import functools
import json
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATHS = {"budget": "", "connections": "/connections"}  # openpi's client knows no path: the budget app is at /


def main(checkpoint: str, port: int) -> None:
    import ray
    from ray import serve

    from pi0.serving.ray_serve import deploy
    from tests.served import PROFILES, switchable

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # the replicas import tests.served
    boards = {}
    try:
        for name, limits in PROFILES.items():
            boards[name] = deploy(functools.partial(switchable, checkpoint), limits, None, 1, 1, "127.0.0.1", port,
                                  app=name, route_prefix=PATHS[name] or "/")
        print(json.dumps({"port": port, "paths": PATHS}), flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for name, board in boards.items():
            serve.delete(name)
            ray.kill(board)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
