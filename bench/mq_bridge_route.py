"""Runs one mq-bridge route (MQTT -> Kafka) until SIGTERM; the e2e benchmark's peer.

    <mq-bridge venv>/bin/python bench/mq_bridge_route.py CONFIG_JSON

Runs under the interpreter of mq-bridge's own virtualenv (never the project's), which
`bench/e2e.py` creates; it imports nothing from usagepipe. CONFIG_JSON is one route
(`input`, `output`, ...) as mq-bridge's `Route.from_config` takes it. Prints `ready`
once the route is deployed, and `stopped` after a clean stop.
"""

import json
import signal
import sys
import threading

from mq_bridge import Route  # type: ignore[import-not-found]  # the peer's venv only


def main() -> int:
    config = json.loads(sys.argv[1])
    route = Route.from_config(config, "mqtt_to_kafka")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    route.start()
    print("ready", flush=True)
    done.wait()
    route.stop()
    route.join()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
